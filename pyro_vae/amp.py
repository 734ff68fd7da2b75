"""``--amp bf16``: the networks' matrix products in bfloat16, every density in float32.

Autocasting the whole objective is not safe for a VAE: the log-densities of z under q and p
(values near -50 to -100 nats for 50 latent dimensions) would be summed in bfloat16, whose
8-bit mantissa rounds such sums by a quarter of a nat or more, and importance weights
exp(log p - log q) would inherit that error. So autocast is scoped to the weight layers
(``nn.Linear``, convolutions, and subclasses such as Pyro's ``MaskedLinear``): each runs its
product in bfloat16 (accumulating in float32) and hands a float32 result on. Activations,
likelihoods, log-densities, logsumexp and the loss stay float32.
"""

from __future__ import annotations

import torch
from torch import nn

from pyro_vae.errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16}
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)


def amp_dtype(name: str | None) -> torch.dtype | None:
    if not name:
        return None
    try:
        return AMP_DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown --amp {name!r}; choose {', '.join(AMP_DTYPES)} (or leave --amp out for float32)") from None


def autocast_layers(module: nn.Module, device_type: str, dtype: torch.dtype) -> list:
    """Run every weight layer inside ``module`` under ``torch.autocast(device_type, dtype)``
    and cast its output back to float32; returns the hook handles (``.remove()`` undoes it)."""

    def enter(layer, args):
        layer._amp_context = torch.autocast(device_type, dtype=dtype)
        layer._amp_context.__enter__()

    def leave(layer, args, output):
        context = layer.__dict__.pop("_amp_context", None)
        if context is not None:
            context.__exit__(None, None, None)
        return output.float() if torch.is_tensor(output) and output.is_floating_point() else output

    handles = []
    for layer in module.modules():
        if isinstance(layer, LAYERS):
            handles.append(layer.register_forward_pre_hook(enter))
            handles.append(layer.register_forward_hook(leave, always_call=True))
    return handles
