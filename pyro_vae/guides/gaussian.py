"""Amortized diagonal-Gaussian guide q(z|x) = N(mu(x), diag sigma(x)^2)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch

from pyro_vae.checks import check_features
from pyro_vae.distributions import ReparamNormal
from pyro_vae.nets import GaussianHead
from pyro_vae.programs import BuiltinProgram
from pyro_vae.registry import GUIDES


@GUIDES.register("gaussian")
class GaussianGuide(BuiltinProgram):
    """q(z|x) = N(mu(x), diag sigma(x)^2) with an MLP (or ``net="conv"``) encoder (Kingma & Welling 2014)."""

    latent_sites = ("z",)

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 20,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
        net: str = "mlp",
        image_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        self.x_dim, self.z_dim = x_dim, z_dim
        self.encoder = GaussianHead([x_dim, *hidden, z_dim], activation, net=net, image_shape=image_shape)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        loc, scale = self.encoder(x)
        return ReparamNormal(loc, scale, validate_args=False).to_event(1)

    def forward(self, x: torch.Tensor, **context):
        check_features(x, self.x_dim, type(self).__name__)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.posterior(x))
