"""Two Normals that compute the same log-densities as ``pyro.distributions.Normal`` with fewer ops.

In a VAE step on a CPU the tensors are small and the cost is the number of operations, so the
ELBO's two Gaussian terms matter: log q(z|x) of the guide's own sample, and log p(z) under N(0, I).
Values and gradients are identical to ``dist.Normal``'s (tests check both).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class ReparamNormal(dist.Normal):
    """N(loc, scale) that remembers the noise eps of its last ``rsample``: z = loc + scale * eps.

    ``log_prob(z)`` of that same tensor z is -eps^2/2 - log scale - log(2 pi)/2, with the same
    value and the same total gradient as the textbook form (the d/dloc terms cancel exactly).
    Any other value, or a copy with detached parameters (the STL/DReG path derivative), takes
    the textbook form, so gradient estimators that need it are unaffected.
    """

    _cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        z = self.loc + self.scale * eps
        self._cache = (z, eps)
        return z

    def log_prob(self, value):
        if self._cache is not None and value is self._cache[0]:
            return -0.5 * self._cache[1] ** 2 - self.scale.log() - HALF_LOG_2PI
        return super().log_prob(value)

    def expand(self, batch_shape, _instance=None):
        return super().expand(batch_shape, _instance or ReparamNormal.__new__(ReparamNormal))


class StandardNormal(dist.Normal):
    """N(0, 1) with log_prob(z) = -z^2/2 - log(2 pi)/2 (no scale or loc arithmetic)."""

    def __init__(self, shape, device=None, dtype=torch.float32):
        zeros = torch.zeros(shape, device=device, dtype=dtype)
        super().__init__(zeros, torch.ones_like(zeros), validate_args=False)

    def log_prob(self, value):
        return -0.5 * value**2 - HALF_LOG_2PI

    def expand(self, batch_shape, _instance=None):
        new = self.__class__.__new__(self.__class__)
        return super().expand(batch_shape, new)


@torch.distributions.kl.register_kl(dist.Normal, StandardNormal)
def _kl_normal_standard_normal(q, p):
    """KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1)/2 - log s (Kingma & Welling 2014, app. B)."""
    return 0.5 * (q.loc**2 + q.scale**2 - 1) - q.scale.log()
