"""What every estimator shares: latent-site scaling (KL weight beta), the model/guide pairing
check, vectorized importance log-weights, and the ``Objective`` module the training loop uses."""

from __future__ import annotations

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

PARTICLE_PLATE = "num_particles_vectorized"  # the name Pyro's own ELBOs use


class SiteMismatchError(ValueError):
    """A model and guide whose latent sample sites disagree."""


class ScaleLatents(Messenger):
    """Multiply the log-density of every *latent* (unobserved) sample site by ``beta``.

    Applied to model and guide alike, the ELBO becomes E_q[log p(x|z)] - beta KL(q || p):
    the beta-VAE objective (Higgins et al. 2017). Observed sites are left alone.
    """

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.beta * msg["scale"]


def scale_latents(fn, beta):
    """``fn`` with latent sites scaled by ``beta`` (a number, or a tensor under --jit)."""
    return fn if isinstance(beta, (int, float)) and beta == 1.0 else ScaleLatents(beta)(fn)


def latent_site_names(fn, *args, **kwargs) -> list[str]:
    """Names of the unobserved sample sites of ``fn``: declared, or found by tracing."""
    declared = getattr(fn, "latent_sites", None)
    if declared is not None and not args:
        return list(declared)
    with torch.no_grad(), poutine.block():
        trace = poutine.trace(fn).get_trace(*args, **kwargs)
    return [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]]


def check_pair(model, guide, *args, **kwargs) -> None:
    """Raise SiteMismatchError when the guide does not cover exactly the model's latent sites.

    With no data given, uses the declared ``latent_sites`` of both (if declared); with data,
    traces both programs once. Sites the model enumerates (``infer={"enumerate": ...}``) may be
    absent from the guide.
    """
    if not args and (getattr(model, "latent_sites", None) is None or getattr(guide, "latent_sites", None) is None):
        return
    m = set(latent_site_names(model, *args, **kwargs))
    g = set(latent_site_names(guide, *args, **kwargs))
    optional = set(getattr(model, "enumerated_sites", ()))
    missing, extra = m - g - optional, g - m
    if missing or extra:
        raise SiteMismatchError(
            f"model {type(model).__name__} and guide {type(guide).__name__} disagree on latent sites: "
            + (f"the guide does not sample {sorted(missing)}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"the model has no latent site {sorted(extra)}" if extra else "")
            + ". Pair the model with a guide for the same sites (same names)."
        )


def vectorize(fn, num_particles: int, max_plate_nesting: int = 1):
    """Run ``fn`` inside an outermost plate of ``num_particles`` particles, as Pyro's ELBOs do."""

    def wrapped(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1)):
            return fn(*args, **kwargs)

    return wrapped


def site_log_prob(site, detach_params: bool = False) -> torch.Tensor:
    """Scaled, masked log-density of a traced sample site (optionally with stopped parameters)."""
    fn = detach_distribution(site["fn"]) if detach_params else site["fn"]
    return scale_and_mask(fn.log_prob(site["value"]), site["scale"], site["mask"])


def detach_distribution(d):
    """A copy of distribution ``d`` whose parameters carry no gradient (for path derivatives)."""
    import pyro.distributions as dist

    if isinstance(d, dist.Independent):
        return dist.Independent(detach_distribution(d.base_dist), d.reinterpreted_batch_ndims)
    if isinstance(d, dist.MaskedDistribution):
        return dist.MaskedDistribution(detach_distribution(d.base_dist), d._mask)
    if isinstance(d, dist.ExpandedDistribution):
        return detach_distribution(d.base_dist).expand(d.batch_shape)
    params = {k: getattr(d, k).detach() for k in d.arg_constraints if k in d.__dict__}
    try:
        return type(d)(**params, validate_args=False)
    except (TypeError, ValueError):  # e.g. MultivariateNormal's lazy parameters: copy it whole
        from pyro.distributions.util import detach

        return detach(d)


def traces(model, guide, x, num_particles: int, max_plate_nesting: int = 1, **context):
    """Trace the guide with ``num_particles`` vectorized particles and replay the model on it."""
    guide_trace = poutine.trace(vectorize(guide, num_particles, max_plate_nesting)).get_trace(x, **context)
    model_trace = poutine.trace(
        poutine.replay(vectorize(model, num_particles, max_plate_nesting), trace=guide_trace)
    ).get_trace(x, **context)
    return model_trace, guide_trace


def _to_particle_data_shape(lp: torch.Tensor, k: int, b: int) -> torch.Tensor:
    while lp.dim() > 2:  # sum inner plates (dims between particles and data)
        lp = lp.sum(1)
    return lp.expand(k, b) if lp.dim() == 2 else lp.reshape(1, 1).expand(k, b)


def log_weight_parts(model_trace, guide_trace, k: int, b: int, detach_guide_params=False):
    """(log p(x, z), log q(z|x)) per particle and data point, each (K, B).

    Plates' subsample sites are left out: their log-density is 0, and a CPU tensor even when
    the model runs on CUDA (``pyro.plate`` without ``device=``).
    """
    log_p = sum(
        _to_particle_data_shape(site_log_prob(s), k, b)
        for s in model_trace.nodes.values() if s["type"] == "sample" and not site_is_subsample(s)
    )
    log_q = sum(
        _to_particle_data_shape(site_log_prob(s, detach_guide_params), k, b)
        for s in guide_trace.nodes.values()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    )
    return log_p, log_q


def log_weights(model, guide, x, num_particles: int, max_plate_nesting: int = 1,
                detach_guide_params: bool = False, **context) -> torch.Tensor:
    """log w_k(x) = log p(x, z_k) - log q(z_k | x) with z_k ~ q(z|x): a tensor (K, batch).

    Every latent site must sit inside the ``data`` plate (per-data-point latents, as in VAEs).
    ``detach_guide_params`` stops gradients through q's parameters in log q (Roeder et al. 2017).
    """
    model_trace, guide_trace = traces(model, guide, x, num_particles, max_plate_nesting, **context)
    log_p, log_q = log_weight_parts(model_trace, guide_trace, num_particles, x.shape[0], detach_guide_params)
    return log_p - log_q


class Objective(nn.Module):
    """Model, guide and estimator behind one differentiable loss, in nats per data point.

    ``forward(x, beta)`` returns estimator.differentiable_loss(model, guide, x) / batch with the
    latent sites scaled by ``beta``. This is the one module the training loop (and
    DistributedDataParallel) sees, whatever the estimator.
    """

    def __init__(self, model: nn.Module, guide: nn.Module, estimator):
        super().__init__()
        check_pair(model, guide)
        self.model, self.guide, self.estimator = model, guide, estimator

    def __call__(self, *args, **kwargs):
        from pyro_vae.programs import objective_scope

        with objective_scope():  # the loop optimizes parameters(): built-ins skip pyro.module
            return super().__call__(*args, **kwargs)

    def forward(self, x: torch.Tensor, beta: float = 1.0, **context) -> torch.Tensor:
        model, guide = scale_latents(self.model, beta), scale_latents(self.guide, beta)
        return self.estimator.differentiable_loss(model, guide, x, **context) / x.shape[0]
