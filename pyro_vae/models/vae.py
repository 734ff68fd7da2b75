"""The standard VAE p(z) p(x|z) with an MLP decoder, and the linear-Gaussian model."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.checks import check_features
from pyro_vae.distributions import StandardNormal
from pyro_vae.errors import ConfigError
from pyro_vae.likelihoods import make_likelihood
from pyro_vae.nets import decoder_net
from pyro_vae.programs import BuiltinProgram
from pyro_vae.registry import MODELS


class LatentVariableModel(BuiltinProgram):
    """Base for models of one latent site ``z`` with a N(0, I) prior and observed site ``x``.

    Subclasses define ``decode(z) -> distribution over x``. ``forward(x)`` is the Pyro program
    p(z) p(x|z) inside ``pyro.plate("data", batch)``. A plain ``nn.Module`` (PyroModules work
    too): the training loop optimises ``parameters()`` with a torch optimizer, and skipping
    PyroModule's per-parameter ``pyro.param`` statements makes each step cheaper.
    """

    latent_sites = ("z",)

    def __init__(self, x_dim: int, z_dim: int):
        super().__init__()
        self.x_dim, self.z_dim = x_dim, z_dim

    def prior(self, batch_shape=()) -> dist.Distribution:
        return StandardNormal(tuple(batch_shape) + (self.z_dim,), device=self.device).to_event(1)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, **context):
        check_features(x, self.x_dim, type(self).__name__)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior((x.shape[0],)))
            return pyro.sample("x", self.decode(z), obs=x)

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True) -> torch.Tensor:
        """Draw n data points through the prior; ``mean=True`` returns the decoder mean."""
        d = self.decode(self.prior((n,)).sample())
        return d.mean if mean else d.sample()


@MODELS.register("vae")
class VAE(LatentVariableModel):
    """p(z) = N(0, I), p(x|z) = likelihood(decoder(z)) (Kingma & Welling 2014); the decoder is an
    MLP, or with ``net="conv"`` transposed convolutions to images of ``image_shape``."""

    def __init__(
        self,
        x_dim: int = 784,
        z_dim: int = 20,
        hidden: Sequence[int] = (400,),
        activation: str = "relu",
        likelihood: str = "bernoulli",
        train_mean: torch.Tensor | None = None,
        net: str = "mlp",
        image_shape: Sequence[int] | None = None,
    ):
        super().__init__(x_dim, z_dim)
        self.likelihood = make_likelihood(likelihood, x_dim)
        self.decoder = decoder_net(net, z_dim, self.likelihood.out_features(), hidden, activation, image_shape)
        if train_mean is not None:
            self.likelihood.init_bias(self.decoder.out_bias, train_mean)

    def decode(self, z):
        return self.likelihood(self.decoder(z))


@MODELS.register("linear")
class LinearGaussian(LatentVariableModel):
    """Probabilistic PCA: p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I) (Tipping & Bishop 1999).

    The marginal is exact: p(x) = N(b, W W^T + s^2 I), and so is the posterior
    p(z|x) = N(M^-1 W^T (x - b), s^2 M^-1) with M = W^T W + s^2 I. Gaussian by construction:
    any other ``likelihood`` is refused.
    """

    def __init__(self, x_dim: int = 784, z_dim: int = 20, noise_scale: float = 1.0,
                 likelihood: str = "gaussian"):
        if likelihood != "gaussian":
            raise ConfigError(f"--model linear is Gaussian by construction (probabilistic PCA) and cannot use "
                             f"--likelihood {likelihood}: drop --likelihood (or give gaussian), or use --model vae")
        super().__init__(x_dim, z_dim)
        self.weight = nn.Parameter(torch.randn(x_dim, z_dim) / z_dim**0.5)
        self.bias = nn.Parameter(torch.zeros(x_dim))
        self.log_noise = nn.Parameter(torch.tensor(float(noise_scale)).log())

    def decode(self, z):
        return dist.Normal(z @ self.weight.T + self.bias, self.log_noise.exp()).to_event(1)

    def marginal(self) -> dist.MultivariateNormal:
        s2 = self.log_noise.exp() ** 2
        cov = self.weight @ self.weight.T + s2 * torch.eye(self.x_dim, device=self.weight.device)
        return dist.MultivariateNormal(self.bias, covariance_matrix=cov)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per data point."""
        return self.marginal().log_prob(x)

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """Exact p(z|x) for each row of x."""
        s2 = self.log_noise.exp() ** 2
        m = self.weight.T @ self.weight + s2 * torch.eye(self.z_dim, device=x.device)
        m_inv = torch.linalg.inv(m)
        loc = (x - self.bias) @ self.weight @ m_inv.T
        return dist.MultivariateNormal(loc, covariance_matrix=s2 * m_inv)
