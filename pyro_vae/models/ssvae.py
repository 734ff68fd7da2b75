"""The semi-supervised VAE M2 (Kingma et al. 2014): the label y is a latent variable where
unknown, enumerated in parallel by TraceEnum_ELBO (estimator ``enum``), and observed where known."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.checks import check_features
from pyro_vae.errors import ConfigError
from pyro_vae.models.vae import VAE
from pyro_vae.registry import MODELS

NEEDS_LABELS = ("ssvae needs labelled data, for the number of classes (num_classes): train on a data set with "
                "labels (e.g. --dataset mnist --labels 100), or give num_classes")


def split_labelled(x: torch.Tensor, y: torch.Tensor | None):
    """((x_l, y_l), x_u): rows with a label (y >= 0) and rows without (y = -1 or no y)."""
    if y is None:
        return (x[:0], None), x
    known = y >= 0
    return (x[known], y[known]), x[~known]


@MODELS.register("ssvae")
class SSVAE(VAE):
    """M2 of Kingma et al. 2014 ("Semi-supervised learning with deep generative models"):
    p(y) = Cat(1/C), p(z) = N(0, I), p(x|y,z) = likelihood(decoder([z, onehot(y)])).

    ``forward(x, y)`` takes labels with -1 where unknown: labelled rows observe ``y_l`` (plate
    ``labelled``), the others sample ``y_u``, which TraceEnum_ELBO sums out exactly.
    """

    context_keys = ("y",)
    enumerated_sites = ("y_u",)
    not_traceable = ("it splits each batch into labelled and unlabelled rows by their labels' values, "
                     "sizes a trace would freeze")

    def __init__(self, x_dim: int = 784, z_dim: int = 50, hidden: Sequence[int] = (500,),
                 activation: str = "softplus", likelihood: str = "bernoulli",
                 train_mean: torch.Tensor | None = None, num_classes: int | None = 10, **net_options):
        if not num_classes:
            raise ConfigError(NEEDS_LABELS)
        # the decoder reads [z, onehot(y)]; M2's prior on z is N(0, I), independent of y
        super().__init__(x_dim, z_dim + num_classes, hidden, activation, likelihood, train_mean, **net_options)
        self.z_dim, self.cond_dim = z_dim, num_classes

    def prior(self, batch_shape=(), y=None):
        return dist.Normal(torch.zeros(self.z_dim, device=self.device), 1.0).expand(
            tuple(batch_shape) + (self.z_dim,)).to_event(1)

    def _part(self, suffix: str, x: torch.Tensor, y: torch.Tensor | None):
        if len(x) == 0:
            return
        with pyro.plate(f"data_{suffix}", len(x)):
            label_prior = dist.Categorical(logits=torch.zeros(self.cond_dim, device=x.device))
            y = pyro.sample(f"y_{suffix}", label_prior, obs=y)
            z = pyro.sample(f"z_{suffix}", self.prior((len(x),)))
            pyro.sample(f"x_{suffix}", self.decode(z, y), obs=x)

    def forward(self, x, y=None, **context):
        check_features(x, self.x_dim, type(self).__name__)
        (x_l, y_l), x_u = split_labelled(x, y)
        self._part("l", x_l, y_l)
        self._part("u", x_u, None)

    def decode(self, z, y=None):
        # enumerated labels arrive as (C, 1, ...) integer tensors: broadcast them against z
        c = nn.functional.one_hot(y.long(), self.cond_dim).float()
        shape = torch.broadcast_shapes(z.shape[:-1], c.shape[:-1])
        return super().decode(torch.cat([z.expand(*shape, -1), c.expand(*shape, -1)], -1))

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True, y=None) -> torch.Tensor:
        if y is None:
            y = torch.arange(n, device=self.device) % self.cond_dim
        elif isinstance(y, int):
            y = torch.full((n,), y, device=self.device)
        d = self.decode(self.prior((n,)).sample(), y)
        return d.mean if mean else d.sample()
