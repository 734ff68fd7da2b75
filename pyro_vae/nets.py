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


CONV_CHANNELS = {
    "conv": (32, 64),  # two halvings: 28x28 and 32x32 images (MNIST, CIFAR)
    "conv4": (32, 32, 64, 64),  # four: disentanglement_lib's conv_encoder/deconv_decoder for 64x64
}
NETS = ("mlp", *CONV_CHANNELS)


def _conv_grid(image_shape: Sequence[int], net: str = "conv") -> tuple[int, int, int]:
    """(channels, height, width) of the grid after ``net``'s stride-2 convolutions."""
    if image_shape is None or len(image_shape) != 3:
        raise ConfigError(f"the conv nets need images of shape (channels, height, width), got {image_shape}; "
                         f"use --net mlp for flat data")
    c, h, w = image_shape
    factor = 2 ** len(CONV_CHANNELS[net])
    if h % factor or w % factor:
        sizes = "28 and 32 work" if net == "conv" else "32 and 64 work"
        raise ConfigError(f"--net {net} halves the image {len(CONV_CHANNELS[net])} times, so height and width "
                         f"must be multiples of {factor} ({sizes}), got {h}x{w}; resize with --image-size")
    return c, h // factor, w // factor


class ConvEncoder(nn.Module):
    """Flat images (..., C*H*W) -> stride-2 4x4 convolutions (``net="conv"``: 32, 64 channels;
    ``"conv4"``: 32, 32, 64, 64, Locatello et al. 2019's encoder) -> MLP [channels*grid, *hidden,
    out_features]."""

    def __init__(self, image_shape, out_features: int, hidden: Sequence[int] = (), act: str = "relu",
                 net: str = "conv"):
        super().__init__()
        c, h, w = _conv_grid(image_shape, net)
        self.image_shape = tuple(image_shape)
        layers: list[nn.Module] = []
        for c_in, c_out in zip((c, *CONV_CHANNELS[net]), CONV_CHANNELS[net]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), activation(act)]
        self.conv = nn.Sequential(*layers, nn.Flatten())
        self.head = MLP([CONV_CHANNELS[net][-1] * h * w, *hidden, out_features], act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = self.conv(x.reshape(-1, *self.image_shape))
        return self.head(h).reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """Latents (..., z) -> MLP [z, *hidden, channels*grid] -> the encoder's convolutions mirrored
    as stride-2 4x4 transposed convolutions -> ``params`` maps per image channel, flattened
    channel-major to (..., params*C*H*W) (so a 2-parameter likelihood sees its first parameter in
    the first half), plus a per-feature output bias ``out_bias``."""

    def __init__(self, z_dim: int, image_shape, params: int = 1, hidden: Sequence[int] = (), act: str = "relu",
                 net: str = "conv"):
        super().__init__()
        c, h, w = _conv_grid(image_shape, net)
        channels = CONV_CHANNELS[net][::-1]
        self.grid = (channels[0], h, w)
        self.fc = nn.Sequential(MLP([z_dim, *hidden, channels[0] * h * w], act), activation(act))
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), activation(act)]
        self.deconv = nn.Sequential(*layers, nn.ConvTranspose2d(channels[-1], params * c, 4, 2, 1), nn.Flatten())
        self.out_bias = nn.Parameter(torch.zeros(params * int(torch.tensor(image_shape).prod())))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.deconv(self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, *self.grid))
        return (h + self.out_bias).reshape(*lead, -1)


def _check_net(net: str) -> None:
    if net not in NETS:
        raise ConfigError(f"unknown net {net!r}; choose one of {', '.join(NETS)}")


def encoder_net(net: str, x_dim: int, out_features: int, hidden: Sequence[int], act: str,
                image_shape=None) -> nn.Module:
    """The encoder body for ``net`` ("mlp", "conv" or "conv4"): (..., x_dim) -> (..., out_features)."""
    _check_net(net)
    if net in CONV_CHANNELS:
        return ConvEncoder(image_shape, out_features, hidden, act, net)
    return MLP([x_dim, *hidden, out_features], act)


def decoder_net(net: str, z_dim: int, out_features: int, hidden: Sequence[int], act: str,
                image_shape=None) -> nn.Module:
    """The decoder for ``net``: (..., z_dim) -> (..., out_features); ``out_bias`` is its output bias."""
    _check_net(net)
    if net in CONV_CHANNELS:
        _conv_grid(image_shape, net)  # conv nets need images: the same error as the encoder's
        numel = int(torch.tensor(image_shape).prod())
        if out_features % numel:
            raise ConfigError(f"decoder output {out_features} is not a multiple of the image size {image_shape}")
        return ConvDecoder(z_dim, image_shape, out_features // numel, list(hidden)[::-1], act, net)
    return MLP([z_dim, *hidden, out_features], act)
