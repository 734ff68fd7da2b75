"""What every estimator shares: latent-site scaling (KL weight beta), the model/guide pairing
check, vectorized importance log-weights, and the ``Objective`` module the training loop uses."""

from __future__ import annotations

import math
import warnings
from itertools import zip_longest
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import check_model_guide_match, check_site_shape
from torch import nn

from pyro_vae.errors import ConfigError, ProgramError, SiteMismatchError
from pyro_vae.sites import is_latent, is_observed, is_sample, latent_sites

PARTICLE_PLATE = "num_particles_vectorized"  # the name Pyro's own ELBOs use



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
    return [s["name"] for s in latent_sites(trace)]


def _plates(site) -> dict:
    """The vectorized plates around a site, by name, the particle plate left out."""
    return {f.name: f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE}


def _unvectorized_traces(model, guide, args, kwargs):
    with torch.no_grad(), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return model_trace, guide_trace


def check_pair(model, guide, *args, **kwargs) -> None:
    """Raise SiteMismatchError unless the guide samples exactly the model's latent sites, with the
    same shapes, as Pyro's ``check_model_guide_match`` and ``check_site_shape`` require.

    With no data given, compares the declared ``latent_sites`` of both (if declared); with data,
    traces each once. Sites the model enumerates
    (``infer={"enumerate": "parallel"}``, or declared ``enumerated_sites``) may be absent from the
    guide; guide sites marked ``infer={"is_auxiliary": True}`` may be absent from the model.
    Called once before training, not in the per-step path.
    """
    if not args and not kwargs:
        if getattr(model, "latent_sites", None) is None or getattr(guide, "latent_sites", None) is None:
            return
        model_sites, guide_sites = set(latent_site_names(model)), set(latent_site_names(guide))
        _check_site_names(model, guide, model_sites, guide_sites, set(getattr(model, "enumerated_sites", ())))
        return
    with torch.no_grad(), poutine.block():  # each on its own: a guide of the wrong shape may crash the model
        model_trace = poutine.trace(model).get_trace(*args, **kwargs)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_sites = {n: s for n, s in model_trace.nodes.items() if is_latent(s)}
    guide_sites = {n: s for n, s in guide_trace.nodes.items() if is_latent(s)}
    enumerated = {n for n, s in model_sites.items() if s["infer"].get("enumerate") == "parallel"}
    auxiliary = {n for n, s in guide_sites.items() if s["infer"].get("is_auxiliary")}
    _check_site_names(model, guide, set(model_sites), set(guide_sites) - auxiliary,
                      enumerated | set(getattr(model, "enumerated_sites", ())))
    for name in sorted(set(model_sites) & set(guide_sites)):
        _check_site_shapes(name, model_sites[name]["fn"], guide_sites[name]["fn"])
    for trace, who in ((model_trace, "model"), (guide_trace, "guide")):
        trace.compute_log_prob(site_filter=lambda name, site: not site_is_subsample(site))
        for name, site in trace.nodes.items():
            if is_sample(site):
                try:
                    check_site_shape(site, max_plate_nesting=float("inf"))
                except ValueError as e:
                    raise SiteMismatchError(f"{who} site {name!r}: {' '.join(str(e).split())}") from None


def _check_site_names(model, guide, model_sites: set, guide_sites: set, enumerated: set) -> None:
    missing, extra = model_sites - guide_sites - enumerated, guide_sites - model_sites
    if missing or extra:
        raise SiteMismatchError(
            f"model {_name(model)} and guide {_name(guide)} disagree on latent sites: "
            + (f"the guide does not sample {sorted(missing)}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"the model has no latent site {sorted(extra)}" if extra else "")
            + ". Pair the model with a guide for the same sites (same names), or enumerate a "
              "model site with infer={'enumerate': 'parallel'} and train with 'enum'."
        )


def _check_site_shapes(name: str, model_fn, guide_fn) -> None:
    """Pyro's rule: same event dim, and batch shapes equal (missing leading dims count as 1)."""
    model_shape, guide_shape = tuple(model_fn.shape()), tuple(guide_fn.shape())
    same_event = model_fn.event_dim == guide_fn.event_dim
    if same_event and all(m == g for m, g in zip_longest(reversed(model_shape), reversed(guide_shape), fillvalue=1)):
        return
    raise SiteMismatchError(
        f"model and guide disagree on the shape of site {name!r}: the model's is {model_shape} with "
        f"{model_fn.event_dim} event dims, the guide's {guide_shape} with {guide_fn.event_dim}. Give "
        f"the guide's distribution the model's shape (e.g. .to_event(n) for event dims)."
    )


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def vectorize(fn, num_particles: int, max_plate_nesting: int = 1):
    """Run ``fn`` inside an outermost plate of ``num_particles`` particles, as Pyro's ELBOs do:
    the particle plate sits at dim ``-(max_plate_nesting + 1)``, left of every plate of ``fn``."""

    def wrapped(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=-(max_plate_nesting + 1)):
            return fn(*args, **kwargs)

    return wrapped


def guess_max_plate_nesting(model, guide, args, kwargs) -> int:
    """How many plates the pair nests (the most negative plate dim), from one unvectorized
    trace, as Pyro's ``ELBO._guess_max_plate_nesting``: the particle plate goes left of them."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    tracing = torch._C._get_tracing_state()  # under --jit: keep the guess out of the recorded graph
    torch._C._set_tracing_state(None)
    try:
        with torch.random.fork_rng(devices=devices):  # the guess leaves the random numbers alone
            model_trace, guide_trace = _unvectorized_traces(model, guide, args, kwargs)
    finally:
        torch._C._set_tracing_state(tracing)
    dims = [f.dim for trace in (model_trace, guide_trace) for site in trace.nodes.values()
            if site["type"] == "sample" for f in site["cond_indep_stack"] if f.vectorized]
    return -min(dims) if dims else 0


def site_log_prob(site, detach_params: bool = False, scale=None) -> torch.Tensor:
    """Masked log-density of a traced sample site, times ``scale`` (default: the site's own),
    optionally with stopped parameters."""
    fn = detach_distribution(site["fn"]) if detach_params else site["fn"]
    return scale_and_mask(fn.log_prob(site["value"]), site["scale"] if scale is None else scale, site["mask"])


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


VECTORIZED, REPEATED = "vectorized", "repeated"  # how K particles are laid out (particle_layout)


def repeat_rows(args: tuple, kwargs: dict, k: int) -> tuple[tuple, dict]:
    """Every tensor argument whose first dim is the batch's (that of the first tensor argument,
    x) repeated k times along it: row ``j * B + i`` is data point i's j-th particle."""
    tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.dim() > 0]
    if k == 1 or not tensors:
        return args, kwargs
    b = tensors[0].shape[0]

    def rep(a):
        return a.repeat(k, *([1] * (a.dim() - 1))) if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == b else a

    return tuple(rep(a) for a in args), {key: rep(v) for key, v in kwargs.items()}


def pair_traces(model, guide, args: tuple, kwargs: dict, num_particles: int, max_plate_nesting: int,
                layout: str = VECTORIZED):
    """Trace ``guide(*args, **kwargs)`` with ``num_particles`` vectorized particles (the particle
    plate at dim ``-(max_plate_nesting + 1)``) and replay the model on it.

    ``layout=REPEATED`` (for programs that do not broadcast over a particle dimension, see
    ``particle_layout``): no particle plate; the batch and its context are repeated
    ``num_particles`` times instead (``repeat_rows``), and ``importance_log_weights`` folds the
    rows back into (K, B)."""
    if layout == REPEATED:
        args, kwargs = repeat_rows(args, kwargs, num_particles)
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        model_trace.repeated_particles = guide_trace.repeated_particles = num_particles
    else:
        guide_trace = poutine.trace(vectorize(guide, num_particles, max_plate_nesting)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(
            poutine.replay(vectorize(model, num_particles, max_plate_nesting), trace=guide_trace)
        ).get_trace(*args, **kwargs)
    if is_validation_enabled():  # as Pyro's get_importance_trace: once before training, not in the loop
        validate_traces(model_trace, guide_trace, max_plate_nesting + (layout != REPEATED))
    return model_trace, guide_trace


def validate_traces(model_trace, guide_trace, max_plate_nesting) -> None:
    """Pyro's checks of a model/guide trace pair (``pyro.util.check_model_guide_match``: the
    guide's sites exist in the model with the same event dims, a warning for extra guide sites;
    ``check_site_shape``: batch shapes agree with the plates), and the guide's sites must say
    whether they are reparameterized (``pyro.factor`` in a guide has no ``has_rsample``)."""
    check_model_guide_match(model_trace, guide_trace, max_plate_nesting)
    for trace in (model_trace, guide_trace):
        trace.compute_log_prob()  # the distributions' own value checks, and the shapes checked next
        for site in trace.nodes.values():
            if is_sample(site):
                check_site_shape(site, max_plate_nesting)
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and getattr(site["fn"], "has_rsample", None) is None:
            raise ProgramError(f"guide site {name!r} ({type(site['fn']).__name__}) has a missing specification "
                             f"of has_rsample: a guide samples distributions (pyro.factor belongs in the model)")


def traces(model, guide, x, num_particles: int, max_plate_nesting: int = 1, layout: str = VECTORIZED,
           **context):
    """``pair_traces`` for programs called as ``model(x, **context)``."""
    return pair_traces(model, guide, (x,), context, num_particles, max_plate_nesting, layout)


_SAID: set = set()


def particle_layout(model, guide, args: tuple, kwargs: dict, max_plate_nesting: int,
                    num_particles: int = 2) -> str:
    """VECTORIZED when the programs broadcast over a particle dimension (one trace with
    ``num_particles`` vectorized particles works: the shapes the program will see), else REPEATED: K particles as K copies of the batch. Programs
    written for one particle often do not broadcast (``torch.cat([z, one_hot(y)], -1)`` meets a
    (K, B, D) z and a (B, C) label); repeating the batch gives the same numbers for more memory.
    Said once per program. The probe leaves the random numbers and a ``--jit`` trace alone."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    tracing = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), pyro.validation_enabled(False):
            try:
                pair_traces(model, guide, args, kwargs, num_particles, max_plate_nesting)
                return VECTORIZED
            except (RuntimeError, ValueError, IndexError) as e:
                vectorized_error = e
            try:
                pair_traces(model, guide, args, kwargs, num_particles, max_plate_nesting, REPEATED)
            except Exception:  # noqa: BLE001 - the program fails either way: show the first error
                raise vectorized_error from None
    finally:
        torch._C._set_tracing_state(tracing)
    name = _name(model)
    if name not in _SAID:
        _SAID.add(name)
        first = (str(vectorized_error).strip().splitlines() or [""])[0][:160]
        warnings.warn(f"{name} does not broadcast over a particle dimension ({first}); its particles "
                      f"are drawn by repeating the batch once per particle (the same estimates, more "
                      f"memory per step)", stacklevel=2)
    return REPEATED


def _to_particle_data_shape(lp: torch.Tensor, k: int, b: int) -> torch.Tensor:
    while lp.dim() > 2:  # sum inner plates (dims between particles and data)
        lp = lp.sum(1)
    return lp.expand(k, b) if lp.dim() == 2 else lp.reshape(1, 1).expand(k, b)


class ImportanceWeights(NamedTuple):
    """log w = log p(x, z) - log q(z | x) per particle and data point, and the factor outside.

    ``log_p`` and ``log_q`` are (K, B): K particles, B data points of the data plate (B = 1 when
    the weight is the whole batch's). The bound is ``scale * sum_b bound_b(log_p - log_q)``.
    """

    log_p: torch.Tensor
    log_q: torch.Tensor
    scale: float | torch.Tensor
    particle_dim: int  # where the particles are in the sites' batch shapes
    data_dim: int | None  # where the data points are; None: one weight for the whole batch

    @property
    def log_w(self) -> torch.Tensor:
        return self.log_p - self.log_q


def find_data_plate(model_trace):
    """The plate whose entries are the data points: the one plate around every observed site; if
    several are, the subsampled one, else the one named ``data``, else the one that also holds
    latent sites. None when no plate holds every observed site."""
    observed = [s for s in model_trace.nodes.values()
                if is_observed(s)]
    if not observed:
        return None
    common = set.intersection(*(set(_plates(s)) for s in observed))
    candidates = [_plates(observed[0])[n] for n in sorted(common)]
    latent_plates = set().union(*(set(_plates(s)) for s in model_trace.nodes.values() if is_latent(s)))
    for keep in (lambda f: f.full_size is not None and f.full_size != f.size,
                 lambda f: f.name == "data",
                 lambda f: f.name in latent_plates):
        if len(candidates) <= 1:
            break
        candidates = [f for f in candidates if keep(f)] or candidates
    if len(candidates) > 1:
        raise ProgramError(f"cannot tell which of the plates {[f.name for f in candidates]} around the observed "
                         f"site holds the data points; name that plate 'data'")
    return candidates[0] if candidates else None


def _observed_scale(model_trace):
    """The scale common to every observed site (a subsampling factor N/B, ``poutine.scale``)."""
    scales = [s["scale"] for s in model_trace.nodes.values()
              if is_observed(s)]
    scale = scales[0]
    for other in scales[1:]:
        if other is not scale and not (isinstance(other, (int, float)) and other == scale):
            raise ProgramError("the observed sites carry different scales (subsampling factors); the "
                             "importance-weighted bounds need one: give every observed site the same scale")
    if torch.is_tensor(scale) and scale.numel() != 1:
        raise ProgramError("the observed site's scale is a tensor of shape "
                         f"{tuple(scale.shape)}; the importance-weighted bounds need one number (N/B)")
    return scale


def _reduce(lp, particle_dim: int, data_dim: int | None, shape: tuple) -> torch.Tensor | None:
    """Sum a site's log-density over every dim but the particle and data dims -> ``shape``."""
    if not torch.is_tensor(lp):
        return None
    n = -particle_dim
    if lp.dim() < n:
        lp = lp.reshape((1,) * (n - lp.dim()) + tuple(lp.shape))
    keep = {lp.dim() + particle_dim} | ({lp.dim() + data_dim} if data_dim is not None else set())
    summed = [d for d in range(lp.dim()) if d not in keep]
    if summed:
        lp = lp.sum(summed)
    return lp.reshape(lp.shape + (1,) * (2 - lp.dim())).expand(shape)


def importance_log_weights(model_trace, guide_trace, detach_guide_params: bool = False) -> ImportanceWeights:
    """Log importance weights from a guide trace with vectorized particles and the model
    replayed on it.

    Per data point (every latent inside the data plate, as in a VAE): with s the scale of the
    observed site (N/B under ``plate(N, subsample_size=B)`` or ``poutine.scale``), each site's
    log-density enters with its own scale divided by s, and s multiplies the bound from outside:
    s * sum_b log (1/K) sum_k w_bk. A latent's KL weight beta (``ScaleLatents``) stays inside.

    With a latent outside the data plate (a global latent), or no plate around the observed
    sites, the weight is the whole batch's: log w_k sums every site, each with its own scale,
    global terms once (as Pyro's RenyiELBO): an exact IWAE bound on the batch's log p(x) without
    subsampling; under subsampling the usual scaled estimate of it. At K = 1 both are the ELBO.
    ``detach_guide_params`` stops gradients through q's parameters in log q (Roeder et al. 2017).
    """
    particle = next((f for t in (guide_trace, model_trace) for s in t.nodes.values() if s["type"] == "sample"
                     for f in s["cond_indep_stack"] if f.name == PARTICLE_PLATE), None)
    repeats = getattr(model_trace, "repeated_particles", None)
    if particle is None and repeats is None:
        raise ValueError("importance weights need traces with vectorized particles (base.pair_traces)")
    for name, site in model_trace.nodes.items():
        if is_latent(site) and name not in guide_trace.nodes:
            raise SiteMismatchError(
                f"model site {name!r} is not sampled by the guide; the importance-weighted estimators draw "
                f"every latent from the guide: sample {name!r} in the guide, or use 'enum' for a site "
                f"the model enumerates")
    data = find_data_plate(model_trace)
    latents = [s for t in (model_trace, guide_trace) for s in t.nodes.values() if is_latent(s)]
    per_point = data is not None and all(data.name in _plates(s) for s in latents)
    scale = _observed_scale(model_trace) if per_point else 1.0
    if particle is None:  # REPEATED layout: rows j * B + i; a singleton particle dim left of every plate
        if not per_point and repeats > 1:
            raise ProgramError("the model has a latent outside the data plate and does not "
                             "broadcast over particles: its particles cannot be drawn by repeating the batch. "
                             "Make the program broadcast (e.g. expand labels to z's batch shape), or use K=1")
        particle = _Frame(dim=-1 - max((len(site["fn"].batch_shape) for t in (model_trace, guide_trace)
                                        for site in t.nodes.values()
                                        if is_sample(site)), default=0),
                          size=1)
    shape = (particle.size, data.size if per_point else 1)
    data_dim = data.dim if per_point else None

    def total(trace, sites, detach):
        parts = [_reduce(site_log_prob(s, detach, _divide(s["scale"], scale)), particle.dim, data_dim, shape)
                 for s in sites]
        parts = [p for p in parts if p is not None]
        return sum(parts[1:], parts[0]) if parts else torch.zeros(shape)

    model_sites = [s for s in model_trace.nodes.values() if is_sample(s)]
    guide_sites = [s for s in guide_trace.nodes.values() if is_latent(s)]
    log_p, log_q = total(model_trace, model_sites, False), total(guide_trace, guide_sites, detach_guide_params)
    if repeats is not None:
        log_p, log_q = log_p.reshape(repeats, -1), log_q.reshape(repeats, -1)
    return ImportanceWeights(log_p, log_q, scale, particle.dim, data_dim)


class _Frame(NamedTuple):
    dim: int
    size: int


def _divide(site_scale, scale):
    return site_scale if isinstance(scale, (int, float)) and scale == 1.0 else site_scale / scale


def log_weight_parts(model_trace, guide_trace, k: int, b: int, detach_guide_params=False):
    """(log p(x, z), log q(z|x)) per particle and data point, each (K, B), the data plate's scale
    left out (see ``importance_log_weights``; ``k`` and ``b`` are read from the traces)."""
    weights = importance_log_weights(model_trace, guide_trace, detach_guide_params)
    return weights.log_p, weights.log_q


def log_weights(model, guide, x, num_particles: int, max_plate_nesting: int = 1,
                detach_guide_params: bool = False, **context) -> torch.Tensor:
    """log w_k(x) = log p(x, z_k) - log q(z_k | x) with z_k ~ q(z|x): a tensor (K, batch), the
    data plate's subsampling scale left out (see ``importance_log_weights``)."""
    model_trace, guide_trace = traces(model, guide, x, num_particles, max_plate_nesting, **context)
    return importance_log_weights(model_trace, guide_trace, detach_guide_params).log_w


class Objective(nn.Module):
    """Model, guide and estimator behind one differentiable loss, in nats per data point.

    ``forward(x, beta)`` returns estimator.differentiable_loss(model, guide, x) / batch with the
    latent sites scaled by ``beta``. This is the one module the training loop (and
    DistributedDataParallel) sees, whatever the estimator.
    """

    def __init__(self, model: nn.Module, guide: nn.Module, estimator):
        super().__init__()
        check_pair(model, guide)
        for program in (model, guide):  # a program may refuse estimators (the VQ-VAE's point-mass guide)
            if callable(getattr(program, "check_estimator", None)):
                program.check_estimator(estimator)
        self.model, self.guide, self.estimator = model, guide, estimator

    def validate(self, x: torch.Tensor, beta: float = 1.0) -> None:
        """DataError for non-finite data or data outside a built-in likelihood's support
        (a user's own distributions are checked by Pyro's validation), ConfigError for a KL
        weight that is negative or not finite."""
        from pyro_vae.checks import check_finite

        if not torch.is_tensor(beta) and not (math.isfinite(beta) and beta >= 0):
            raise ConfigError(f"beta = {beta}: the KL weight must be a finite number >= 0")
        check_finite(x, "the data")
        likelihood = getattr(self.model, "likelihood", None)
        if hasattr(likelihood, "check_support"):
            likelihood.check_support(x)

    def __call__(self, *args, **kwargs):
        from pyro_vae.programs import objective_scope

        with objective_scope():  # the loop optimizes parameters(): built-ins skip pyro.module
            return super().__call__(*args, **kwargs)

    def forward(self, x: torch.Tensor, beta: float = 1.0, **context) -> torch.Tensor:
        if is_validation_enabled():  # as Pyro's own checks: off in the training loop, on by default
            self.validate(x, beta)
        model, guide = scale_latents(self.model, beta), scale_latents(self.guide, beta)
        return self.estimator.differentiable_loss(model, guide, x, **context) / x.shape[0]
