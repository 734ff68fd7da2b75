"""The two-stochastic-layer VAE of Burda et al. (2016): p(z2) p(z1|z2) p(x|z1)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch

from pyro_vae.likelihoods import DataError, make_likelihood
from pyro_vae.models.vae import LatentVariableModel
from pyro_vae.nets import MLP, GaussianHead
from pyro_vae.registry import MODELS


@MODELS.register("hvae2")
class HierarchicalVAE(LatentVariableModel):
    """Top-down generation p(z2) p(z1|z2) p(x|z1) with diagonal Gaussian layers (Burda et al.
    2016, sec. 5): z2 (``z_dim``, 50) -> ``hidden2`` (100, 100) -> z1 (``z1_dim``, 100) ->
    ``hidden`` reversed (200, 200) -> x. Latent sites ``z2`` and ``z1`` sit in the ``data`` plate.

    ``decode(z1)`` is p(x|z1), so reconstructions go through the guide's q(z1|x) and
    ``sample(n)`` draws z2 ~ p(z2), z1 ~ p(z1|z2).
    """

    latent_sites = ("z2", "z1")

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 50,
        hidden: Sequence[int] = (200, 200),
        activation: str = "tanh",
        likelihood: str = "bernoulli",
        train_mean: torch.Tensor | None = None,
        z1_dim: int = 100,
        hidden2: Sequence[int] = (100, 100),
    ):
        super().__init__(x_dim, z_dim)
        self.z1_dim = z1_dim
        self.likelihood = make_likelihood(likelihood, x_dim)
        self.z1_net = GaussianHead([z_dim, *hidden2, z1_dim], activation)
        self.decoder = MLP([z1_dim, *reversed(list(hidden)), self.likelihood.out_features()], activation)
        if train_mean is not None:
            self.likelihood.init_bias(self.decoder.out_layer.bias, train_mean)

    def z1_given_z2(self, z2: torch.Tensor) -> dist.Distribution:
        loc, scale = self.z1_net(z2)
        return dist.Normal(loc, scale, validate_args=False).to_event(1)

    def decode(self, z1):
        return self.likelihood(self.decoder(z1))

    def forward(self, x: torch.Tensor, **context):
        if x.dim() != 2 or x.shape[-1] != self.x_dim:
            raise DataError(f"{type(self).__name__} expects data of shape (batch, {self.x_dim}), got "
                            f"{tuple(x.shape)}. Flatten each data point to {self.x_dim} features.")
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", self.prior((x.shape[0],)))
            z1 = pyro.sample("z1", self.z1_given_z2(z2))
            return pyro.sample("x", self.decode(z1), obs=x)

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True) -> torch.Tensor:
        z1 = self.z1_given_z2(self.prior((n,)).sample()).sample()
        d = self.decode(z1)
        return d.mean if mean else d.sample()
