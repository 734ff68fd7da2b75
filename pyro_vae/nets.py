"""Network blocks shared by every model and guide."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {', '.join(sorted(ACTIVATIONS))}"
        ) from None


class MLP(nn.Sequential):
    """Linear layers of the given sizes with an activation between them (none after the last)."""

    def __init__(self, sizes: Sequence[int], act: str = "relu"):
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least input and output sizes, got {list(sizes)}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(sizes) - 2:
                layers.append(activation(act))
        super().__init__(*layers)

    @property
    def out_layer(self) -> nn.Linear:
        return self[-1]


class GaussianHead(nn.Module):
    """Maps features to (loc, scale) of a diagonal Gaussian; scale = softplus(.) + eps, or exp(.)"""

    def __init__(self, sizes: Sequence[int], act: str = "relu", scale: str = "exp"):
        super().__init__()
        *body, d_out = sizes
        self.body = MLP(list(body) + [2 * d_out], act)
        self.d_out = d_out
        self.scale = scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.body(x).split(self.d_out, dim=-1)
        if self.scale == "exp":
            return loc, torch.exp(raw)
        return loc, nn.functional.softplus(raw) + 1e-6
