"""Network blocks shared by every model and guide."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyro_vae.errors import ConfigError

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
        raise ConfigError(
            f"unknown activation {name!r}; choose one of {', '.join(sorted(ACTIVATIONS))}"
        ) from None


class MLP(nn.Sequential):
    """Linear layers of the given sizes with an activation between them (none after the last)."""

    def __init__(self, sizes: Sequence[int], act: str = "relu"):
        if len(sizes) < 2:
            raise ConfigError(f"an MLP needs at least input and output sizes, got {list(sizes)}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(sizes) - 2:
                layers.append(activation(act))
        super().__init__(*layers)

    @property
    def out_layer(self) -> nn.Linear:
        return self[-1]

    @property
    def out_bias(self) -> torch.Tensor:
        return self[-1].bias


class GaussianHead(nn.Module):
    """Maps features to (loc, scale) of a diagonal Gaussian; scale = softplus(.) + eps, or exp(.).
    ``net="conv"`` puts a ``ConvEncoder`` for images of ``image_shape`` in front."""

    def __init__(self, sizes: Sequence[int], act: str = "relu", scale: str = "exp", net: str = "mlp",
                 image_shape=None):
        super().__init__()
        d_in, *hidden, d_out = sizes
        self.body = encoder_net(net, d_in, 2 * d_out, hidden, act, image_shape)
        self.d_out = d_out
        self.scale = scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._loc_scale(self.body(x))

    def forward_with_label(self, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward([x, onehot(y)])`` without the concatenation (MLP bodies): the first layer
        W [x; onehot(y)] + b = W_x x + W_y[:, y] + b, so x meets W_x once however many labels y
        broadcasts over (an enumerated label: 10x less work in the largest product)."""
        if not isinstance(self.body, MLP):
            raise TypeError(f"forward_with_label needs an MLP body, not {type(self.body).__name__}")
        first, *rest = self.body
        w_x, w_y = first.weight.split([first.in_features - num_classes, num_classes], dim=1)
        h = nn.functional.linear(x, w_x, first.bias) + w_y.T[y.long()]  # (..., hidden) broadcasts
        for layer in rest:
            h = layer(h)
        return self._loc_scale(h)

    def _loc_scale(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = h.split(self.d_out, dim=-1)
        if self.scale == "exp":
            return loc, torch.exp(raw)
        return loc, nn.functional.softplus(raw) + 1e-6


def _conv_grid(image_shape: Sequence[int]) -> tuple[int, int, int]:
    if image_shape is None or len(image_shape) != 3:
        raise ConfigError(f"the conv nets need images of shape (channels, height, width), got {image_shape}; "
                         f"use --net mlp for flat data")
    c, h, w = image_shape
    if h % 4 or w % 4:
        raise ConfigError(f"the conv nets halve the image twice, so height and width must be multiples "
                         f"of 4 (28 and 32 work), got {h}x{w}; resize with --image-size 32")
    return c, h // 4, w // 4


class ConvEncoder(nn.Module):
    """Flat images (..., C*H*W) -> two stride-2 4x4 convolutions (32, 64 channels) -> MLP
    [64*H/4*W/4, *hidden, out_features]. For 28x28 and 32x32 images with any channel count."""

    channels = (32, 64)

    def __init__(self, image_shape, out_features: int, hidden: Sequence[int] = (), act: str = "relu"):
        super().__init__()
        c, h, w = _conv_grid(image_shape)
        self.image_shape = tuple(image_shape)
        c1, c2 = self.channels
        self.conv = nn.Sequential(nn.Conv2d(c, c1, 4, 2, 1), activation(act),
                                  nn.Conv2d(c1, c2, 4, 2, 1), activation(act), nn.Flatten())
        self.head = MLP([c2 * h * w, *hidden, out_features], act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = self.conv(x.reshape(-1, *self.image_shape))
        return self.head(h).reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """Latents (..., z) -> MLP [z, *hidden, 64*H/4*W/4] -> two stride-2 4x4 transposed
    convolutions -> ``params`` maps per image channel, flattened channel-major to
    (..., params*C*H*W) (so a 2-parameter likelihood sees its first parameter in the first half),
    plus a per-feature output bias ``out_bias``."""

    def __init__(self, z_dim: int, image_shape, params: int = 1, hidden: Sequence[int] = (), act: str = "relu"):
        super().__init__()
        c, h, w = _conv_grid(image_shape)
        c1, c2 = ConvEncoder.channels
        self.grid = (c2, h, w)
        self.fc = nn.Sequential(MLP([z_dim, *hidden, c2 * h * w], act), activation(act))
        self.deconv = nn.Sequential(nn.ConvTranspose2d(c2, c1, 4, 2, 1), activation(act),
                                    nn.ConvTranspose2d(c1, params * c, 4, 2, 1), nn.Flatten())
        self.out_bias = nn.Parameter(torch.zeros(params * c * h * w * 16))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.deconv(self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, *self.grid))
        return (h + self.out_bias).reshape(*lead, -1)


NETS = ("mlp", "conv")


def _check_net(net: str) -> None:
    if net not in NETS:
        raise ConfigError(f"unknown net {net!r}; choose one of {', '.join(NETS)}")


def encoder_net(net: str, x_dim: int, out_features: int, hidden: Sequence[int], act: str,
                image_shape=None) -> nn.Module:
    """The encoder body for ``net`` ("mlp" or "conv"): (..., x_dim) -> (..., out_features)."""
    _check_net(net)
    if net == "conv":
        return ConvEncoder(image_shape, out_features, hidden, act)
    return MLP([x_dim, *hidden, out_features], act)


def decoder_net(net: str, z_dim: int, out_features: int, hidden: Sequence[int], act: str,
                image_shape=None) -> nn.Module:
    """The decoder for ``net``: (..., z_dim) -> (..., out_features); ``out_bias`` is its output bias."""
    _check_net(net)
    if net == "conv":
        _conv_grid(image_shape)  # conv nets need images: the same error as the encoder's
        numel = int(torch.tensor(image_shape).prod())
        if out_features % numel:
            raise ConfigError(f"decoder output {out_features} is not a multiple of the image size {image_shape}")
        return ConvDecoder(z_dim, image_shape, out_features // numel, list(hidden)[::-1], act)
    return MLP([z_dim, *hidden, out_features], act)
