"""Observation distributions p(x | decoder output), one small module each.

A likelihood turns the decoder's raw output (``out_features(x_dim)`` numbers per data point)
into a distribution over the flat feature vector x with ``event_shape == (x_dim,)``, and
checks that data lie in its support before training starts.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from pyro_vae.checks import DataError, base_distribution, data_site, elementwise_support
from pyro_vae.registry import Registry

LIKELIHOODS = Registry("likelihood")


class Likelihood(nn.Module):
    name = "likelihood"
    params_per_feature = 1

    def __init__(self, x_dim: int):
        super().__init__()
        self.x_dim = x_dim

    def out_features(self) -> int:
        return self.params_per_feature * self.x_dim

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        raise NotImplementedError

    def check_support(self, x: torch.Tensor, what: str = "data") -> None:
        """Raise DataError when x holds values this likelihood gives zero density."""

    def init_bias(self, bias: torch.Tensor, train_mean: torch.Tensor) -> None:
        """Initialise the decoder's output bias from the training mean (Burda et al.)."""


def _check_unit_interval(x: torch.Tensor, name: str, what: str) -> None:
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"the {name} likelihood needs {what} values in [0, 1], but they range over "
            f"[{lo:g}, {hi:g}]. Rescale the data (e.g. x / 255 for 8-bit images) or choose "
            f"--likelihood gaussian."
        )


class _SoftBoolean(constraints.Constraint):
    """{0, 1}, with grey levels in [0, 1] admitted as soft targets: the cross-entropy
    -[x log p + (1 - x) log(1 - p)] scores them (pytorch/examples' VAE on MNIST grey levels),
    though not as probabilities. ``check`` admits [0, 1]; ``strict_check`` only {0, 1}."""

    is_discrete = True
    event_dim = 0

    def check(self, value):
        return (value >= 0) & (value <= 1)

    def strict_check(self, value):
        return (value == 0) | (value == 1)

    def describe(self) -> str:
        return "{0, 1} (or grey levels in [0, 1])"


class _Grid(constraints.Constraint):
    """The ``levels`` values k / (levels - 1) of [0, 1] (8-bit data: k/255), within 1e-3 of a level."""

    is_discrete = True
    event_dim = 0

    def __init__(self, levels: int = 256):
        self.levels = levels
        super().__init__()

    def check(self, value):
        k = value * (self.levels - 1)
        return (value >= 0) & (value <= 1) & ((k - torch.round(k)).abs() <= 1e-3)

    def describe(self) -> str:
        return f"the {self.levels}-level grid k/{self.levels - 1} of [0, 1]"


class SoftBernoulli(dist.Bernoulli):
    """Bernoulli whose support admits grey levels as soft targets (``_SoftBoolean``): the same
    log_prob, -BCE(logits, x), which is a log-probability only for x in {0, 1}."""

    support = _SoftBoolean()


class IndependentBernoulli(dist.Independent):
    """Bernoulli(logits) features as one event, ``log_prob`` = -BCE(logits, x) summed over the
    features *before* negating: the same value as ``Bernoulli(logits).to_event(1)``, with one
    full-size negation less per step each way (about 10% of an iwae1 K=50 step on CPU)."""

    def log_prob(self, value):
        logits, value = broadcast_all(self.base_dist.logits, value)
        nll = nn.functional.binary_cross_entropy_with_logits(logits, value, reduction="none")
        return -nll.sum(tuple(range(-self.reinterpreted_batch_ndims, 0)))


@LIKELIHOODS.register("bernoulli")
class Bernoulli(Likelihood):
    """Bernoulli(sigmoid(h)) per feature: for binary data (and, loosely, grey levels in [0, 1])."""

    name = "bernoulli"

    def forward(self, h):
        return IndependentBernoulli(SoftBernoulli(logits=h, validate_args=False), 1)

    def check_support(self, x, what="data"):
        _check_unit_interval(x, self.name, what)

    def init_bias(self, bias, train_mean):
        p = train_mean.clamp(1e-3, 1 - 1e-3)
        bias.data.copy_(torch.log(p) - torch.log1p(-p))


@LIKELIHOODS.register("continuous-bernoulli")
class ContinuousBernoulli(Bernoulli):
    """The normalised continuous Bernoulli of Loaiza-Ganem & Cunningham (2019) for x in [0, 1]."""

    name = "continuous-bernoulli"

    def forward(self, h):
        return dist.ContinuousBernoulli(logits=h, validate_args=False).to_event(1)


@LIKELIHOODS.register("gaussian")
class Gaussian(Likelihood):
    """N(h, s^2) per feature with a learned per-feature log scale s (initialised to 0.1)."""

    name = "gaussian"

    def __init__(self, x_dim):
        super().__init__(x_dim)
        self.log_scale = nn.Parameter(torch.full((x_dim,), math.log(0.1)))

    def forward(self, h):
        return dist.Normal(h, self.log_scale.exp(), validate_args=False).to_event(1)

    def init_bias(self, bias, train_mean):
        bias.data.copy_(train_mean)


@LIKELIHOODS.register("laplace")
class Laplace(Gaussian):
    """Laplace(h, b) per feature with a learned per-feature log scale b (initialised to 0.1):
    an L1 reconstruction loss, more robust to outlying pixels than the Gaussian's L2."""

    name = "laplace"

    def forward(self, h):
        return dist.Laplace(h, self.log_scale.exp(), validate_args=False).to_event(1)


class DiscretizedLogisticDistribution(dist.TorchDistribution):
    """Logistic(loc, scale) integrated over the bins of an 8-bit grid on [0, 1]
    (Salimans et al. 2017, PixelCNN++, with one component): values k / (levels - 1), bin
    half-width 1 / (2 (levels - 1)), the two end bins extended to -inf and +inf. A probability
    mass function, so -log p / (D ln 2) is bits per dimension."""

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}

    @property
    def support(self):
        return _Grid(self.levels)

    def __init__(self, loc, scale, levels: int = 256, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        self.levels = levels
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape)
        return type(self)(self.loc.expand(shape), self.scale.expand(shape), self.levels)

    @property
    def mean(self):
        return self.loc.clamp(0.0, 1.0)

    def log_prob(self, x):
        half = 0.5 / (self.levels - 1)
        upper = (x - self.loc + half) / self.scale
        lower = (x - self.loc - half) / self.scale
        # log(sigmoid(u) - sigmoid(l)) = logsigmoid(u) + logsigmoid(-l) + log(1 - exp(l - u))
        mid = (nn.functional.logsigmoid(upper) + nn.functional.logsigmoid(-lower)
               + torch.log(-torch.expm1(-2 * half / self.scale)))
        first = nn.functional.logsigmoid(upper)  # the bin at 0 takes all mass below it
        last = nn.functional.logsigmoid(-lower)  # the bin at 1 takes all mass above it
        return torch.where(x < half, first, torch.where(x > 1 - half, last, mid))

    def sample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            u = torch.rand(shape, device=self.loc.device).clamp(1e-6, 1 - 1e-6)
            x = self.loc.expand(shape) + self.scale.expand(shape) * (u.log() - (-u).log1p())
            return torch.round(x.clamp(0, 1) * (self.levels - 1)) / (self.levels - 1)


@LIKELIHOODS.register("discretized-logistic")
class DiscretizedLogistic(Likelihood):
    """8-bit images in [0, 1] (values k/255): a discretized logistic per feature with loc and log
    scale from the decoder (two outputs per feature). Its log-likelihood is a log-probability,
    so the evaluated bits per dimension compare with published 8-bit image figures."""

    name = "discretized-logistic"
    params_per_feature = 2

    def forward(self, h):
        loc, log_scale = h.split(self.x_dim, dim=-1)
        return dist.Independent(
            DiscretizedLogisticDistribution(loc, log_scale.clamp(min=-7.0).exp()), 1)

    def check_support(self, x, what="data"):
        _check_unit_interval(x, self.name, what)
        off_grid = (x * 255 - torch.round(x * 255)).abs().max()
        if off_grid > 1e-3:
            raise DataError(
                f"the {self.name} likelihood is for 8-bit data (values k/255), but {what} holds values "
                f"{float(off_grid):.3g}/255 off that grid. Use --dataset mnist (not binarized) or other "
                f"8-bit images, or --likelihood gaussian for continuous data."
            )

    def init_bias(self, bias, train_mean):
        bias.data[: self.x_dim].copy_(train_mean)
        bias.data[self.x_dim :].fill_(math.log(0.05))


def make_likelihood(name: str, x_dim: int) -> Likelihood:
    return LIKELIHOODS.get(name)(x_dim)


BERNOULLI_FAMILY = ("bernoulli", "continuous-bernoulli", "discretized-logistic")  # data in [0, 1]


def bits_per_dim(model, x: torch.Tensor, log_px: float, dims: int | None = None, guide=None, **context) -> dict:
    """``{"test_bits_per_dim": -log_px / (dims ln 2)}`` where the model's observation is discrete,
    else ``{"test_bits_per_dim": None, "test_bits_per_dim_note": why}``.

    Discrete: the observed site's ``support.is_discrete`` (Bernoulli, Categorical, the
    discretized logistic's 8-bit grid, ...), so log p(x) is the log of a probability and -log2
    p(x) / D counts bits. Grey levels under a Bernoulli (soft targets) are scored but are not
    probabilities, and a density on continuous values (Normal, Laplace, continuous Bernoulli)
    changes with the data's units: the first get a note, the second no figure.
    ``dims``: the dimensions the model scores (default all features of x); ``guide``: trace the
    model on its draws (``checks.observed_sites``).
    """
    found = data_site(model, x, guide=guide, **context)
    if found is None:
        return {"test_bits_per_dim": None, "test_bits_per_dim_note": "absent: the model has no observed site"}
    fn = found[1]["fn"]
    name = type(base_distribution(fn)).__name__
    if not fn.support.is_discrete:
        return {"test_bits_per_dim": None, "test_bits_per_dim_note":
                f"absent: the observation ({name}) is a density on continuous values, whose bits/dim "
                f"depend on the data's units; bits/dim compare only for discrete data"}
    result = {"test_bits_per_dim": -log_px / ((dims or x[0].numel()) * math.log(2))}
    strict = getattr(elementwise_support(fn.support), "strict_check", None)
    if strict is not None and not bool(strict(x).all()):
        result["test_bits_per_dim_note"] = (f"the {name} scores grey levels as soft targets, which is not a "
                                            f"probability of the data: these bits/dim compare only with other "
                                            f"soft-target figures, not with binarized data's")
    return result
