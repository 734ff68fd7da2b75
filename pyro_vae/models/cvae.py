"""The conditional VAE (Sohn et al. 2015): p(z|y) p(x|z,y) with context y, class labels or any
feature vector (e.g. the known part of an image)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.checks import DataError, check_features
from pyro_vae.errors import ConfigError
from pyro_vae.models.vae import VAE
from pyro_vae.nets import GaussianHead
from pyro_vae.registry import MODELS


def embed_context(y: torch.Tensor, cond_dim: int) -> torch.Tensor:
    """Integer labels -> one-hot rows of width ``cond_dim``; float rows pass through."""
    if y is None:
        raise DataError("this conditional model needs its context y (labels or features): pass y=...")
    if not torch.is_floating_point(y):
        if int(y.max()) >= cond_dim or int(y.min()) < 0:
            raise DataError(f"labels must lie in 0..{cond_dim - 1}, got {int(y.min())}..{int(y.max())}")
        return nn.functional.one_hot(y.long(), cond_dim).float()
    if y.shape[-1] != cond_dim:
        raise DataError(f"context y has {y.shape[-1]} features, the model was built for {cond_dim}")
    return y


@MODELS.register("cvae")
class CVAE(VAE):
    """p(z|y) = N(mu(y), sigma(y)) from a prior network, p(x|z,y) = likelihood(decoder([z, y]))
    (Sohn et al. 2015, "Learning structured output representation using deep conditional
    generative models"). ``forward(x, y=...)``; ``y`` integer labels (one-hot inside, width
    ``num_classes``) or float features of width ``cond_dim``; ``observed_mask`` scores only some
    features of x, as the quadrant-completion task does."""

    context_keys = ("y",)

    def __init__(self, x_dim: int = 784, z_dim: int = 20, hidden: Sequence[int] = (400,),
                 activation: str = "relu", likelihood: str = "bernoulli",
                 train_mean: torch.Tensor | None = None, num_classes: int | None = None,
                 cond_dim: int | None = None, **net_options):
        cond_dim = cond_dim or num_classes
        if not cond_dim:
            raise ConfigError("cvae needs the context width: num_classes (labelled data) or cond_dim")
        super().__init__(x_dim, z_dim + cond_dim, hidden, activation, likelihood, train_mean, **net_options)
        self.z_dim, self.cond_dim = z_dim, cond_dim
        self.prior_net = GaussianHead([cond_dim, *hidden, z_dim], activation)

    def prior(self, batch_shape=(), y=None):
        loc, scale = self.prior_net(embed_context(y, self.cond_dim))
        return dist.Normal(loc, scale).to_event(1)

    def decode(self, z, y=None):
        c = embed_context(y, self.cond_dim)
        return super().decode(torch.cat([z, c.expand(*z.shape[:-1], c.shape[-1])], -1))

    def forward(self, x, y=None, observed_mask=None, **context):
        """``observed_mask`` (bool, like x): score only those features of x, p(x[mask] | z, y)."""
        check_features(x, self.x_dim, type(self).__name__)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(y=y))
            px = self.decode(z, y)
            if observed_mask is not None:
                px = px.base_dist.mask(observed_mask).to_event(1)
            return pyro.sample("x", px, obs=x)

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, y=None) -> torch.Tensor:
        """n draws of x ~ p(x|z,y), z ~ p(z|y); ``y`` a label (int), n labels, or (n, cond_dim)
        features; by default the labels 0, 1, ..., cycling."""
        if y is None:
            y = torch.arange(n, device=self.device) % self.cond_dim
        elif isinstance(y, int):
            y = torch.full((n,), y, device=self.device)
        d = self.decode(self.prior(y=y).sample(), y)
        return d.mean if mean else d.sample()


QUADRANTS = (1, 2, 3)


def quadrant_mask(image_shape: Sequence[int], quadrants: int) -> torch.Tensor:
    """The hidden pixels (True) of a flat image (C*H*W,) when ``quadrants`` are given, laid out as
    in Pyro's CVAE tutorial: 1 = the bottom-left quadrant, 2 = the left half, 3 = all but the
    bottom-right quadrant."""
    if quadrants not in QUADRANTS:
        raise ConfigError(f"quadrants must be 1, 2 or 3 (the number of given quadrants), got {quadrants}")
    if image_shape is None or len(image_shape) != 3:
        raise ConfigError(f"quadrant completion needs images of shape (C, H, W), got {image_shape}")
    c, h, w = image_shape
    visible = torch.zeros(h, w, dtype=torch.bool)
    visible[h // 2:, : w // 2] = True
    if quadrants >= 2:
        visible[:, : w // 2] = True
    if quadrants == 3:
        visible[: h // 2, :] = True
    return (~visible).expand(c, h, w).reshape(-1)


@MODELS.register("cvae-quadrant")
class QuadrantCVAE(CVAE):
    """Image completion (Sohn et al. 2015, sec. 5.1; Pyro's CVAE tutorial): given ``quadrants``
    (1, 2 or 3) quadrants x_v of an image, model the rest x_h,
    p(x_h | x_v) = int p(z | x_v) p(x_h | z, x_v) dz.

    x is the whole image; the context x_v (hidden pixels set to -1, as in the tutorial) is cut from
    x inside ``forward`` and only the hidden pixels are scored, so every estimator's log p(x) and
    ``pyro-vae eval`` report log p(x_h | x_v). Pair with guide ``gaussian``: the recognition net
    q(z | x) = q(z | x_v, x_h) sees the whole image. ``complete(x)`` draws completions."""

    context_keys = ()

    def __init__(self, x_dim: int = 784, z_dim: int = 20, hidden: Sequence[int] = (400,),
                 activation: str = "relu", likelihood: str = "bernoulli",
                 train_mean: torch.Tensor | None = None, quadrants: int = 1,
                 image_shape: Sequence[int] | None = (1, 28, 28), num_classes=None, **net_options):
        super().__init__(x_dim, z_dim, hidden, activation, likelihood, train_mean, cond_dim=x_dim,
                         image_shape=image_shape, **net_options)
        mask = quadrant_mask(image_shape, quadrants)
        if mask.numel() != x_dim:
            raise ConfigError(f"image_shape {tuple(image_shape)} has {mask.numel()} pixels, the data {x_dim}")
        self.quadrants = quadrants
        self.scored_dims = int(mask.sum())  # bits per dimension divide by the hidden pixels only
        self.register_buffer("hidden_mask", mask, persistent=False)

    def visible(self, x: torch.Tensor) -> torch.Tensor:
        """The context x_v: x with its hidden pixels set to -1."""
        return x.masked_fill(self.hidden_mask, -1.0)

    def forward(self, x, **context):
        return super().forward(x, y=self.visible(x), observed_mask=self.hidden_mask)

    @torch.no_grad()
    def complete(self, x: torch.Tensor, n: int = 1, mean: bool = True) -> torch.Tensor:
        """n completions (n, batch, D) of each row of x: its visible pixels kept, the hidden ones
        drawn from p(x_h | z, x_v) (its mean by default) with z ~ p(z | x_v)."""
        y = self.visible(x)
        d = self.decode(self.prior(y=y).sample((n,)), y)
        return torch.where(self.hidden_mask, d.mean if mean else d.sample(), x)

    def sample(self, n: int, mean: bool = True, y=None):
        raise ConfigError("cvae-quadrant completes given images rather than sampling from nothing: "
                         "use model.complete(x) to complete the hidden quadrants of given images")
