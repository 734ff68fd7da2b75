"""The conditional Gaussian guide q(z|x,y) for models with context y (cvae)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch

from pyro_vae.errors import ConfigError
from pyro_vae.models.cvae import embed_context
from pyro_vae.nets import GaussianHead
from pyro_vae.programs import BuiltinProgram
from pyro_vae.registry import GUIDES


@GUIDES.register("conditional")
class ConditionalGaussianGuide(BuiltinProgram):
    """q(z|x,y) = N(mu([x, y]), diag sigma([x, y])^2), the recognition network of Sohn et al. 2015."""

    latent_sites = ("z",)
    context_keys = ("y",)

    def __init__(self, x_dim: int = 784, z_dim: int = 20, hidden: Sequence[int] = (400,),
                 activation: str = "relu", num_classes: int | None = None, cond_dim: int | None = None):
        super().__init__()
        self.cond_dim = cond_dim or num_classes
        if not self.cond_dim:
            raise ConfigError("the conditional guide needs the context width: num_classes or cond_dim")
        self.encoder = GaussianHead([x_dim + self.cond_dim, *hidden, z_dim], activation)

    def posterior(self, x: torch.Tensor, y=None) -> dist.Distribution:
        loc, scale = self.encoder(torch.cat([x, embed_context(y, self.cond_dim)], -1))
        return dist.Normal(loc, scale, validate_args=False).to_event(1)

    def forward(self, x, y=None, **context):
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.posterior(x, y))
