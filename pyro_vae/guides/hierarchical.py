"""Bottom-up guide for the two-stochastic-layer VAE: q(z1|x) q(z2|z1) (Burda et al. 2016)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch

from pyro_vae.nets import GaussianHead
from pyro_vae.programs import BuiltinProgram
from pyro_vae.registry import GUIDES


@GUIDES.register("hvae2")
class HierarchicalGuide(BuiltinProgram):
    """q(z1|x) q(z2|z1), diagonal Gaussians: x -> ``hidden`` (200, 200) -> z1 (``z1_dim``, 100)
    -> ``hidden2`` (100, 100) -> z2 (``z_dim``, 50). ``posterior(x)`` is q(z1|x)."""

    latent_sites = ("z1", "z2")

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 50,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
        z1_dim: int = 100,
        hidden2: Sequence[int] = (100, 100),
    ):
        super().__init__()
        self.x_dim, self.z_dim, self.z1_dim = x_dim, z_dim, z1_dim
        self.encoder1 = GaussianHead([x_dim, *hidden, z1_dim], activation)
        self.encoder2 = GaussianHead([z1_dim, *hidden2, z_dim], activation)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z1|x), the first layer (what reconstructions and I(x; z) use)."""
        loc, scale = self.encoder1(x)
        return dist.Normal(loc, scale, validate_args=False).to_event(1)

    def z2_given_z1(self, z1: torch.Tensor) -> dist.Distribution:
        loc, scale = self.encoder2(z1)
        return dist.Normal(loc, scale, validate_args=False).to_event(1)

    def forward(self, x: torch.Tensor, **context):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", self.posterior(x))
            return pyro.sample("z2", self.z2_given_z1(z1))
