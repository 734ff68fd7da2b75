"""ELBO estimators, found by short name with options: ``elbo``, ``meanfield``, ``iwae:K=50`` ...

``make_estimator("iwae:K=50")`` returns a ``pyro.infer.ELBO`` exposing ``differentiable_loss``.
Options follow the name after a colon, comma-separated ``key=value``; ``K`` is the number of
particles (``--particles`` on the command line), vectorized.
"""

from __future__ import annotations

import warnings

import torch
from pyro.infer import TraceEnum_ELBO
from pyro.infer.traceenum_elbo import _compute_dice_elbo

from pyro_vae.errors import ConfigError
from pyro_vae.objectives.base import (
    Objective,
    SiteMismatchError,
    check_pair,
    log_weights,
    scale_latents,
)
from pyro_vae.objectives.elbo import MeanFieldELBO, TraceELBO
from pyro_vae.objectives.kl_penalty import KLPenaltyObjective, kl_per_dimension, make_objective
from pyro_vae.registry import ESTIMATORS

__all__ = ["ESTIMATORS", "KLPenaltyObjective", "Objective", "kl_per_dimension", "make_objective", "SiteMismatchError", "check_pair", "log_weights",
           "make_estimator", "parse_spec", "scale_latents"]


def _pyro_elbo(cls, K: int = 1, max_plate_nesting: float = float("inf"), **opts):
    """Pyro's class with K particles (vectorized; a loop for programs that do not broadcast),
    the plate nesting guessed at the first call unless given."""
    if opts:
        raise ConfigError(f"unexpected options {sorted(opts)}")
    K = importance.check_positive_int("K", K)
    return cls(num_particles=K, vectorize_particles=K > 1, max_plate_nesting=max_plate_nesting)


@ESTIMATORS.register("elbo")
def elbo(**opts):
    """Trace_ELBO: E_q[log p(x, z) - log q(z|x)] by reparameterized Monte Carlo (K particles)."""
    return _pyro_elbo(TraceELBO, **opts)


@ESTIMATORS.register("meanfield")
def meanfield(**opts):
    """The ELBO with each site's KL(q || p) in closed form where valid (objectives/kl.py), else
    Monte Carlo; the default estimator (``MeanFieldELBO.kl_methods`` says which site got which)."""
    return _pyro_elbo(MeanFieldELBO, **opts)


class _TraceEnumELBO(TraceEnum_ELBO):
    """TraceEnum_ELBO whose ``differentiable_loss`` is the loss itself, also under
    ``torch.no_grad()`` (test losses), with no trainable parameters, and with nothing to
    enumerate (a fully labelled batch); its arguments are any ``model(*args, **kwargs)``'s."""

    def _get_traces(self, model, guide, args, kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no sample sites configured for enumeration")
            pairs = list(super()._get_traces(model, guide, args, kwargs))
        yield from pairs

    def differentiable_loss(self, model, guide, *args, **kwargs):
        elbo = sum(_compute_dice_elbo(model_trace, guide_trace)
                   for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs))
        return -torch.as_tensor(elbo) / self.num_particles


@ESTIMATORS.register("enum")
def enum(**opts):
    """TraceEnum_ELBO: the ELBO with discrete latent sites marked ``infer={"enumerate":
    "parallel"}`` summed out exactly, in the guide (the label of the semi-supervised ssvae) or in
    the model alone (a mixture prior's component). ``max_plate_nesting`` is guessed from one
    trace unless given, as Pyro does."""
    opts.setdefault("max_plate_nesting", float("inf"))
    return _pyro_elbo(_TraceEnumELBO, **opts)


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"miwae:M=8,K=8"`` -> ("miwae", {"M": 8, "K": 8})."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"estimator option {item!r} in {spec!r} must look like key=value")
        opts[key.strip()] = _parse_value(value.strip())
    return name.strip(), opts


def make_estimator(spec: str, particles: int | None = None, **defaults):
    """Build an estimator from ``spec``; options in the spec win over ``particles``/defaults."""
    name, opts = parse_spec(spec)
    factory = ESTIMATORS.get(name)
    if particles is not None and not (isinstance(particles, int) and particles >= 1):
        raise ConfigError(f"particles = {particles!r}: the particles K per data point must be an integer >= 1")
    if particles is not None:
        opts.setdefault("K", particles)
    for k, v in defaults.items():
        opts.setdefault(k, v)
    try:
        return factory(**opts)
    except TypeError as e:
        raise ConfigError(f"bad options for estimator {name!r} in {spec!r}: {e}") from None


# Importance-weighted bounds and gradient estimators (objectives/importance.py): the classes
# themselves are the factories, e.g. "miwae:M=8,K=8" -> MIWAE(M=8, K=8).
from pyro_vae.objectives import importance  # noqa: E402

for _cls in (importance.IWAE, importance.STL, importance.DReG, importance.MIWAE,
             importance.CIWAE, importance.PIWAE, importance.Renyi):
    ESTIMATORS.register(_cls.name)(_cls)

from pyro_vae.objectives.tc import BetaTCVAE, tell_dataset_size  # noqa: E402

ESTIMATORS.register(BetaTCVAE.name)(BetaTCVAE)
__all__ += ["BetaTCVAE", "tell_dataset_size"]
