"""Guides beyond the diagonal Gaussian: an inverse autoregressive flow and a low-rank Gaussian."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
from pyro.distributions.transforms import conditional_affine_autoregressive
from torch import nn

from pyro_vae.errors import ConfigError
from pyro_vae.nets import MLP
from pyro_vae.nets import activation as make_activation
from pyro_vae.programs import BuiltinProgram
from pyro_vae.registry import GUIDES


class _Encoder(nn.Module):
    """x -> features h (the last hidden layer), and linear heads on h."""

    def __init__(self, x_dim, hidden, act, heads: Sequence[int]):
        super().__init__()
        if not hidden:
            raise ConfigError("this guide needs at least one hidden layer (--hidden)")
        self.body = nn.Sequential(MLP([x_dim, *hidden], act), make_activation(act))
        self.heads = nn.ModuleList(nn.Linear(hidden[-1], n) for n in heads)

    def forward(self, x):
        h = self.body(x)
        return h, [head(h) for head in self.heads]


@GUIDES.register("iaf")
class IAFGuide(BuiltinProgram):
    """q(z|x): z_0 ~ N(mu(x), diag sigma(x)^2), then ``num_flows`` affine inverse autoregressive
    transforms conditioned on the encoder features h(x) (Kingma et al. 2016, "Improved
    variational inference with inverse autoregressive flow"), Pyro's
    ``conditional_affine_autoregressive``."""

    latent_sites = ("z",)

    def __init__(self, x_dim: int = 784, z_dim: int = 20, hidden: Sequence[int] = (400,),
                 activation: str = "relu", num_flows: int = 2):
        super().__init__()
        self.encoder = _Encoder(x_dim, list(hidden), activation, [z_dim, z_dim])
        self.flows = nn.ModuleList(
            conditional_affine_autoregressive(z_dim, hidden[-1], hidden_dims=[2 * z_dim, 2 * z_dim])
            for _ in range(num_flows))

    def posterior(self, x):
        h, (loc, raw) = self.encoder(x)
        base = dist.Normal(loc, raw.exp(), validate_args=False).to_event(1)
        return dist.ConditionalTransformedDistribution(base, list(self.flows)).condition(h)

    def forward(self, x, **context):
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.posterior(x))


@GUIDES.register("lowrank")
class LowRankGuide(BuiltinProgram):
    """q(z|x) = N(mu(x), F(x) F(x)^T + diag d(x)) with F of rank ``rank`` (default 2): correlated
    latents at O(z * rank) cost, ``LowRankMultivariateNormal``."""

    latent_sites = ("z",)

    def __init__(self, x_dim: int = 784, z_dim: int = 20, hidden: Sequence[int] = (400,),
                 activation: str = "relu", rank: int = 2):
        super().__init__()
        self.z_dim, self.rank = z_dim, rank
        self.encoder = _Encoder(x_dim, list(hidden), activation, [z_dim, z_dim * rank, z_dim])

    def posterior(self, x):
        _, (loc, factor, raw_diag) = self.encoder(x)
        factor = 0.1 * factor.reshape(*factor.shape[:-1], self.z_dim, self.rank)
        return dist.LowRankMultivariateNormal(loc, factor, raw_diag.exp(), validate_args=False)

    def forward(self, x, **context):
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.posterior(x))
