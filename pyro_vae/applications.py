"""What people do with a trained VAE: prior samples, reconstructions, interpolations, latent
traversals, anomaly scores, imputations and representations.

Everything here works from traces of the two Pyro programs, ``model(x, **context)`` and
``guide(x, **context)`` (a function, a bound method such as Pyro's ``vae.model``, an
``nn.Module`` or a ``PyroModule``), so no extra method is required:

- prior samples: the model run with its observation unconditioned (``poutine.uncondition``) on
  n placeholder rows; the observed site's distribution gives the mean (or a draw);
- codes E_q[z|x]: the guide run once with each latent site set to the mean of its distribution
  (``MeanCodes``); discrete sites take their most probable value;
- decoding latent values z: ``poutine.condition(model, data=z)`` on placeholder rows; the mean
  of the observed site's distribution (a Monte Carlo mean where it has no closed form);
- imputation: log p(x_o | z) per feature from the observed site's distribution, log p(z) and
  log q(z | x) from the traces.

``decode(z)``, ``sample(n)``, ``posterior(x)`` and ``prior(batch_shape)`` methods, where a
class has them (the built-ins do), are only faster paths to the same numbers; with one latent
site ``z`` is the guide's first site, the one ``decode`` takes (``z1`` of ``hvae2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_vae.errors import ConfigError, DataError, ProgramError
from pyro_vae.evaluation import evaluate, posterior_means
from pyro_vae.files import save_npy, save_npz, write_json
from pyro_vae.programs import context_keys
from pyro_vae.sites import is_sample

# ----------------------------------------------------------------------------------------------
# traces of the two programs: what every application reads


def trace_program(program, x: torch.Tensor, values: dict | None = None, unconditioned: bool = False,
                  **context):
    """The trace of ``program(x, **context)`` with the sample sites in ``values`` fixed to them
    (``poutine.condition``) and, with ``unconditioned``, its observations drawn instead of
    scored (``poutine.uncondition``)."""
    fn = poutine.condition(program, data=values) if values else program
    if unconditioned:
        fn = poutine.uncondition(fn)
    return poutine.trace(fn).get_trace(x, **context)


def _sample_sites(trace):
    return [s for s in trace.nodes.values() if is_sample(s)]


def latent_sites(trace, exclude=()) -> list[dict]:
    """The sampled (neither observed nor conditioned) sample sites of a trace, in order."""
    return [s for s in _sample_sites(trace) if not s["is_observed"] and not s["infer"].get("was_observed")
            and s["name"] not in exclude]


def observed_site(trace, x: torch.Tensor, exclude=()) -> dict:
    """The model's observation of x: its observed sample site (drawn, under ``uncondition``)
    other than ``exclude``; where there are several (labels observed too), the one with as many
    numbers as x."""
    sites = [s for s in _sample_sites(trace) if (s["is_observed"] or s["infer"].get("was_observed"))
             and s["name"] not in exclude]
    if len(sites) > 1:
        sites = [s for s in sites if s["value"].numel() == x.numel()]
    if len(sites) != 1:
        found = [s["name"] for s in _sample_sites(trace) if s["is_observed"] and s["name"] not in exclude]
        raise ProgramError(f"the model needs one observed sample site for x (pyro.sample(name, d, obs=x)); "
                         f"it has {found or 'none'}")
    return sites[0]


def row_log_prob(site: dict, n: int) -> torch.Tensor:
    """A traced site's scaled, masked log-density summed to one number per data row: (n,)."""
    lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
    frames = [f for f in site["cond_indep_stack"] if f.size == n and f.dim is not None and lp.dim() >= -f.dim]
    if not torch.is_tensor(lp) or not frames:
        raise ProgramError(f"site {site['name']!r} has no value per data row (no plate of size {n} over it): "
                         f"put every latent and observed site inside the data plate")
    lp = lp.movedim(min(f.dim for f in frames), 0)
    return lp.reshape(n, -1).sum(-1)


def distribution_mean(fn, num_samples: int = 256) -> torch.Tensor:
    """E[fn], full shape: the closed form where the family has one, else the average of
    ``num_samples`` draws (a flow, a discretized logistic mixture)."""
    try:
        mean = fn.mean
    except NotImplementedError:
        return fn.sample((num_samples,)).float().mean(0)
    return mean.expand(fn.shape())


def _is_discrete(fn) -> bool:
    return bool(getattr(fn, "has_enumerate_support", False))


class MeanCodes(Messenger):
    """Set every latent site of a guide to the mean of its distribution, E_q[z_s | x, z_<s]
    (the closed form, else a Monte Carlo mean); a discrete site to its most probable value.
    Exact E_q[z|x] for a one-site guide; layered guides are evaluated at the codes above.
    Use it outside the guide's plates, so they have broadcast each distribution first."""

    def __init__(self, num_samples: int = 256):
        super().__init__()
        self.num_samples, self.discrete = num_samples, []

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        fn = msg["fn"]
        if _is_discrete(fn):
            self.discrete.append(msg["name"])
            try:
                msg["value"] = fn.mode.expand(fn.shape())
            except NotImplementedError:
                msg["value"] = fn.sample()
        else:
            msg["value"] = distribution_mean(fn, self.num_samples)


@dataclass
class Codes:
    """Latent values per data row, by site: ``values[site]`` is (rows, ...). ``discrete`` names
    the sites with a discrete support (a class), which have no path between two values."""

    values: dict
    discrete: tuple = ()

    def flat(self, what: str | None = None) -> torch.Tensor:
        """All sites' values side by side, (rows, dims): the code a path or traversal moves
        (``what`` names the task, which refuses discrete sites)."""
        if what and self.discrete:
            raise ProgramError(f"{what} moves a continuous code, and latent site {self.discrete[0]!r} is "
                             f"discrete (a class has no values in between): pass it as context (labels y) or use continuous latents")
        return torch.cat([v.reshape(len(v), -1).float() for v in self.values.values()], -1)

    def unflat(self, z: torch.Tensor) -> dict:
        """``flat``'s inverse for codes of any leading shape (..., dims) -> {site: (M, ...)}."""
        z, out, start = z.reshape(-1, z.shape[-1]), {}, 0
        for name, v in self.values.items():
            size = v[0].numel()
            out[name] = z[:, start:start + size].reshape(len(z), *v.shape[1:]).to(v.dtype)
            start += size
        return out


def _has_fast_path(model, guide=None) -> bool:
    """The built-ins' faster path: ``model.decode(z)`` and ``guide.posterior(x)`` (one site z)."""
    return callable(getattr(model, "decode", None)) and (guide is None or callable(getattr(guide, "posterior", None)))


def take_rows(context: dict, index: torch.Tensor, rows: int) -> dict:
    """Per-row context (tensors of ``rows`` rows) indexed by ``index``; other values kept."""
    return {k: v[index] if torch.is_tensor(v) and v.dim() > 0 and len(v) == rows else v for k, v in context.items()}


@torch.no_grad()
def latent_codes(model, guide, x: torch.Tensor, num_samples: int = 64, seed: int = 0, **context) -> Codes:
    """The codes E_q[z|x] of the rows of x (``MeanCodes`` on a guide trace); with the faster
    path, ``encode``'s E_q[z|x] of the guide's first site, the one ``decode`` takes."""
    if _has_fast_path(model, guide):
        name, mean = next(iter(posterior_means(guide, x, num_samples, seed, **context).items()))
        return Codes({name: mean})
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        codes = MeanCodes(num_samples)
        with codes:
            trace = trace_program(guide, x, **context)
    values = {s["name"]: s["value"] for s in latent_sites(trace)}
    for name, v in values.items():
        if v.dim() == 0 or len(v) != len(x):
            raise ProgramError(f"guide site {name!r} has shape {tuple(v.shape)}, not one value per row of x "
                             f"({len(x)}): codes need per-row latents, inside the data plate")
    return Codes(values, tuple(codes.discrete))


@torch.no_grad()
def decode_mean(model, values: dict, x_rows: torch.Tensor, **context) -> torch.Tensor:
    """E[x | z] for latent values {site: (M, ...)}: the model conditioned on them
    (``poutine.condition``) on the placeholder rows ``x_rows`` (M rows shaped like the data,
    whose values are never scored), the mean of its observed site; (M, D)."""
    m = len(x_rows)
    if len(values) == 1 and _has_fast_path(model):
        d = model.decode(next(iter(values.values())), **context)
        if isinstance(d, torch.distributions.Distribution):
            return distribution_mean(d).reshape(m, -1)
    trace = trace_program(model, x_rows, values, **context)
    return distribution_mean(observed_site(trace, x_rows, exclude=values)["fn"]).reshape(m, -1)


@torch.no_grad()
def prior_samples(model, n: int, like: torch.Tensor, mean: bool = True, **context) -> torch.Tensor:
    """n points from the model, (n, D): x ~ p(x|z), z ~ p(z) (or, with ``mean``, E[x|z]). The
    model runs with its observation unconditioned (``poutine.uncondition``) on n placeholder
    rows, copies of ``like``'s first row; ``model.sample(n)`` is the faster path."""
    if callable(getattr(model, "sample", None)):
        return model.sample(n, mean=mean, **context).reshape(n, -1)
    x = like[:1].expand(n, *like.shape[1:])
    site = observed_site(trace_program(model, x, unconditioned=True, **context), x)
    return (distribution_mean(site["fn"]) if mean else site["value"]).reshape(n, -1)


@torch.no_grad()
def reconstruct(model, guide, x: torch.Tensor, draw: bool = False, seed: int = 0, **context) -> torch.Tensor:
    """E[x' | z] at the code of each row of x, (N, D): z = E_q[z|x] (``latent_codes``), or with
    ``draw`` a draw z ~ q(z|x): the guide traced on x and the model replayed on it (Pyro's
    ``reconstruct_img``)."""
    if not draw:
        return decode_mean(model, latent_codes(model, guide, x, seed=seed, **context).values, x, **context)
    guide_trace = trace_program(guide, x, **context)
    trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, **context)
    return distribution_mean(observed_site(trace, x)["fn"]).reshape(len(x), -1)


@torch.no_grad()
def encode(guide, x: torch.Tensor, num_samples: int = 64, seed: int = 0, **context) -> torch.Tensor:
    """E_q[z | x] of the guide's first latent site for each row of x (N, z_dim): the closed-form
    mean of q(z|x) where it has one, else the average of ``num_samples`` draws (a flow such as
    ``iaf``)."""
    return next(iter(posterior_means(guide, x, num_samples, seed, **context).values()))


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of a and b at fractions t (Shoemake 1985; White 2016,
    "Sampling generative networks"): keeps the norm typical of a Gaussian prior, where the
    straight line passes through the low-density centre. Returns (rows, len(t), dims)."""
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)[:, None, None]
    t = t[None, :, None]
    sin = torch.sin(omega)
    straight = sin.abs() < 1e-6  # (anti)parallel codes: fall back to the straight line
    safe = torch.where(straight, torch.ones_like(sin), sin)
    wa = torch.where(straight, 1 - t, torch.sin((1 - t) * omega) / safe)
    wb = torch.where(straight, t, torch.sin(t * omega) / safe)
    return wa * a[:, None] + wb * b[:, None]


def _decode_grid(model, codes: Codes, z: torch.Tensor, x: torch.Tensor, context: dict) -> torch.Tensor:
    """Decoder means for a grid of flat codes z (rows, ..., dims) built from the rows of x:
    each code decoded with its row's placeholder and context -> (rows, ..., D)."""
    rows, per_row = z.shape[0], math.prod(z.shape[1:-1])
    index = torch.arange(rows, device=x.device).repeat_interleave(per_row)
    means = decode_mean(model, codes.unflat(z), x[index], **take_rows(context, index, rows))
    return means.reshape(*z.shape[:-1], -1)


@torch.no_grad()
def interpolate(model, guide, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10,
                method: str = "slerp", context_b: dict | None = None, **context) -> torch.Tensor:
    """Decoder means along the path from the code of each row of x_a to that of the same row of
    x_b: (rows, steps, D), the first and last columns their reconstructions. ``method``:
    ``slerp`` (spherical, the default) or ``linear``. ``context`` goes with x_a (and decodes the
    path), ``context_b`` (default: the same) with x_b."""
    if steps < 2:
        raise ConfigError(f"--steps must be at least 2 (the two end points), got {steps}")
    if method not in ("slerp", "linear"):
        raise ConfigError(f"unknown interpolation method {method!r}; choose slerp or linear")
    codes = latent_codes(model, guide, x_a, **context)
    z_a = codes.flat("interpolation")
    z_b = latent_codes(model, guide, x_b, **(context if context_b is None else context_b)).flat("interpolation")
    t = torch.linspace(0, 1, steps, device=z_a.device)
    if method == "slerp":
        z = slerp(z_a, z_b, t)
    else:
        z = (1 - t)[None, :, None] * z_a[:, None] + t[None, :, None] * z_b[:, None]
    return _decode_grid(model, codes, z, x_a, context)


@torch.no_grad()
def most_active_dims(model, guide, x: torch.Tensor, n: int, **context) -> list[int]:
    """The n code dimensions whose posterior mean varies most over the rows of x
    (A_u = Var_x E_q[z_u|x], the active-unit statistic of Burda et al. 2016)."""
    variances = latent_codes(model, guide, x, **context).flat("a latent traversal").double().var(0)
    return variances.argsort(descending=True)[:n].tolist()


@torch.no_grad()
def traverse(model, guide, x: torch.Tensor, dims, span: float = 3.0, steps: int = 9, **context) -> torch.Tensor:
    """Latent traversals (Higgins et al. 2017): for each row of x, its code with dimension d set
    in turn to ``steps`` values from -span to span (prior standard deviations of N(0, I)), all
    other dimensions kept, decoded: (rows, len(dims), steps, D). The code is every latent
    site's E_q[z|x] side by side (``Codes.flat``), or the first site's with the faster path."""
    codes = latent_codes(model, guide, x, **context)
    z = codes.flat("a latent traversal")
    bad = [d for d in dims if not 0 <= d < z.shape[-1]]
    if bad:
        raise ConfigError(f"--dims {' '.join(map(str, bad))}: no such latent dimension; this model has {z.shape[-1]} "
                          f"(0..{z.shape[-1] - 1})")
    values = torch.linspace(-span, span, steps, device=z.device)
    grid = z[:, None, None, :].repeat(1, len(dims), steps, 1)
    for i, d in enumerate(dims):
        grid[:, i, :, d] = values
    return _decode_grid(model, codes, grid, x, context)


def anomaly_scores(model, guide, x: torch.Tensor, k: int = 100, seed: int = 0, **evaluate_options) -> np.ndarray:
    """-log p(x) per row by importance sampling with k particles (``evaluate``): the higher,
    the less the model expects the row. The VAE detector of An & Cho 2015 scores the related
    reconstruction probability E_q p(x|z); likelihood scores are known to rank some
    out-of-distribution sets as *more* likely (Nalisnick et al. 2019), so check the AUROC on
    data like yours."""
    r = evaluate(model, guide, x, k, seed=seed, psis=False, return_points=True, **evaluate_options)
    return -r["points"]["log_px"]


def auroc(normal_scores, anomalous_scores) -> float:
    """Area under the ROC curve of scores that should be higher for anomalies: the probability
    that a random anomaly outscores a random normal row, ties counting one half (Mann-Whitney U
    divided by n m)."""
    normal, anomalous = np.asarray(normal_scores, float).ravel(), np.asarray(anomalous_scores, float).ravel()
    if not len(normal) or not len(anomalous):
        raise DataError("AUROC needs at least one normal and one anomalous score")
    scores = np.concatenate([normal, anomalous])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value's first copy
    ranks = (first + (counts - 1) / 2.0)[inverse]  # ties share their average rank
    u = ranks[len(normal):].sum() - len(anomalous) * (len(anomalous) + 1) / 2.0
    return float(u / (len(normal) * len(anomalous)))


# ----------------------------------------------------------------------------------------------
# imputation


def per_feature(fn, what: str):
    """The per-feature distribution of an observation: the base of ``Independent`` wrappers
    (a site inside a feature plate already is one); ValueError when it does not factorize."""
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    if fn.event_shape != ():
        raise ProgramError(f"{what} needs an observation that factorizes over features (Independent, or "
                         f"a feature plate); the model's is {type(fn).__name__} with event shape "
                         f"{tuple(fn.event_shape)}")
    return fn


class _FastChain:
    """The imputation chain's three quantities from ``guide.posterior``, ``model.prior`` and
    ``model.decode`` (one latent site): the built-ins' faster path."""

    def __init__(self, model, guide, n: int, context: dict):
        self.model, self.guide, self.context = model, guide, context
        self.prior = model.prior((n,), **context)

    def draw(self, x):
        q = self.guide.posterior(x, **self.context)
        z = q.sample()
        return z, q.log_prob(z)

    def log_q(self, z, x):
        return self.guide.posterior(x, **self.context).log_prob(z)

    def joint(self, z, x):
        """(log p(z), per-feature p(x|z), x in the distribution's shape)."""
        return self.prior.log_prob(z), per_feature(self.model.decode(z, **self.context), "imputation"), x


class _TraceChain:
    """The same three quantities from traces: the guide (drawn, or conditioned on z to score
    it) and the model conditioned on z, whose observed site gives p(x|z)."""

    def __init__(self, model, guide, n: int, context: dict):
        self.model, self.guide, self.n, self.context = model, guide, n, context

    def draw(self, x):
        trace = trace_program(self.guide, x, **self.context)
        sites = latent_sites(trace)
        return {s["name"]: s["value"] for s in sites}, sum(row_log_prob(s, self.n) for s in sites)

    def log_q(self, z, x):
        trace = trace_program(self.guide, x, z, **self.context)
        return sum(row_log_prob(trace.nodes[name], self.n) for name in z)

    def joint(self, z, x):
        trace = trace_program(self.model, x, z, **self.context)
        extra = [s["name"] for s in latent_sites(trace)]
        if extra:
            raise ProgramError(f"imputation needs log p(z) of the guide's codes alone, and the model also samples "
                             f"{extra} (sites the guide does not): marginalize them in the model, or sample them in the guide")
        obs = observed_site(trace, x, exclude=z)
        return (sum(row_log_prob(trace.nodes[name], self.n) for name in z),
                per_feature(obs["fn"], "imputation"), obs["value"])


def _where_rows(accept: torch.Tensor, a, b):
    """Row-wise choice between a and b (tensors, or dicts of them, with rows first)."""
    if isinstance(a, dict):
        return {k: _where_rows(accept, a[k], b[k]) for k in a}
    return torch.where(accept.reshape(-1, *[1] * (a.dim() - 1)), a, b)


@torch.no_grad()
def impute(model, guide, x: torch.Tensor, observed: torch.Tensor, num_steps: int = 500,
           burn_in: int = 100, seed: int = 0, method: str = "mwg", **context) -> dict:
    """Missing features of x (where ``observed`` is False) from p(x_m | x_o), by the
    Metropolis-within-Gibbs sampler of Mattei & Frellsen 2018 ("Leveraging the exact likelihood
    of deep latent variable models"), with the guide as proposal. The chain on (z, x_m):

    1. propose z' ~ q(z | x_o, x_m) and accept it with probability
       min(1, p(x_o|z') p(z') q(z|x_o, x_m) / (p(x_o|z) p(z) q(z'|x_o, x_m)));
    2. draw x_m ~ p(x_m | z).

    Its stationary law is the exact p(z, x_m | x_o) for any guide with full support (the guide
    only sets the mixing speed). Missing features start at 0 (Mattei & Frellsen's choice).
    ``method="pseudo-gibbs"`` accepts every proposal (Rezende et al. 2014): the older scheme,
    which converges to the right law only when the guide is the exact posterior.

    z is every latent site of the guide; log p(x_o | z) is read per feature from the model's
    observed site (it must factorize over features), log p(z) and log q(z|x) from traces
    (``prior``, ``decode`` and ``posterior`` methods of a one-site model are the faster path).

    Returns ``mean``: x with its missing features replaced by E[x_m | x_o], estimated as the
    average of the decoder mean E[x_m | z] over the steps after ``burn_in`` (Rao-Blackwellized);
    ``sample``: x with the last draw of x_m; ``acceptance``: the share of accepted proposals.
    """
    observed = observed.to(device=x.device, dtype=torch.bool).expand_as(x)
    if method not in ("mwg", "pseudo-gibbs"):
        raise ConfigError(f"unknown imputation method {method!r}; choose mwg or pseudo-gibbs")
    if not 0 <= burn_in < num_steps:
        raise ConfigError(f"burn_in ({burn_in}) must be at least 0 and below num_steps ({num_steps})")
    fast = (_has_fast_path(model, guide) and callable(getattr(model, "prior", None))
            and len(getattr(model, "latent_sites", ())) == 1)
    n = x.shape[0]
    chain = (_FastChain if fast else _TraceChain)(model, guide, n, context)

    def log_target(z, xc):  # log p(x_o | z) + log p(z), and p(x|z) per feature
        log_pz, px, value = chain.joint(z, xc)
        lp = px.log_prob(value).reshape(n, -1)
        if lp.shape != x.shape:
            raise ProgramError(f"the model's observation has {lp.shape[-1]} features per row and x {x.shape[-1]}: "
                             f"impute needs one observed number per feature of x")
        return torch.where(observed, lp, torch.zeros_like(lp)).sum(-1) + log_pz, px

    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        current = torch.where(observed, x, torch.zeros_like(x))
        z, _ = chain.draw(current)
        target, _ = log_target(z, current)
        accepted, total = torch.zeros((), device=x.device), torch.zeros_like(x)
        for step in range(num_steps):
            proposal, log_q_proposal = chain.draw(current)
            proposal_target, _ = log_target(proposal, current)
            log_ratio = proposal_target - target + chain.log_q(z, current) - log_q_proposal
            accept = torch.rand(n, device=x.device).log() < log_ratio
            if method == "pseudo-gibbs":
                accept = torch.ones_like(accept)
            z = _where_rows(accept, proposal, z)
            target = torch.where(accept, proposal_target, target)
            accepted += accept.float().mean()
            _, px = log_target(z, current)
            current = torch.where(observed, x, px.sample().reshape(n, -1))
            if step >= burn_in:
                total += distribution_mean(px).reshape(n, -1)
    mean = total / (num_steps - burn_in)
    return {"mean": torch.where(observed, x, mean), "sample": current, "acceptance": float(accepted) / num_steps}


def missing_mask(n: int, x_dim: int, image_shape, pattern: str = "bottom-half", fraction: float = 0.5,
                 seed: int = 0) -> torch.Tensor:
    """Which features of n points are missing (True), shape (n, x_dim): ``bottom-half`` or
    ``right-half`` of each image (``image_shape`` (C, H, W)), or ``random``: each feature
    missing with probability ``fraction``, independently (missing completely at random)."""
    if pattern == "random":
        if not 0 < fraction < 1:
            raise ConfigError(f"--fraction must lie strictly between 0 and 1, got {fraction}")
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, x_dim, generator=g) < fraction
    if pattern not in ("bottom-half", "right-half"):
        raise ConfigError(f"unknown missing pattern {pattern!r}; choose bottom-half, right-half or random")
    if image_shape is None or len(image_shape) != 3 or math.prod(image_shape) != x_dim:
        raise ConfigError(f"--missing {pattern} needs images, and this data is {x_dim} flat features; use --missing random")
    c, h, w = image_shape
    mask = torch.zeros(c, h, w, dtype=torch.bool)
    if pattern == "bottom-half":
        mask[:, h // 2:, :] = True
    else:
        mask[:, :, w // 2:] = True
    return mask.reshape(1, -1).expand(n, -1)


def imputation_error(truth: torch.Tensor, imputed: torch.Tensor, observed: torch.Tensor) -> float:
    """Root mean squared error over the missing features only."""
    missing = ~observed.to(device=truth.device, dtype=torch.bool).expand_as(truth)
    if not missing.any():
        raise ConfigError("no feature is missing: nothing to score")
    return math.sqrt(float(((truth - imputed)[missing] ** 2).mean()))


class LogisticRegression(NamedTuple):
    """A fitted multinomial logistic regression on standardized features (``fit_logistic``)."""

    weight: torch.Tensor  # (features, classes), for standardized features
    bias: torch.Tensor
    loc: torch.Tensor
    scale: torch.Tensor

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (((features.double() - self.loc) / self.scale) @ self.weight + self.bias).argmax(-1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(features) == labels.long()).double().mean())


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, weight_decay: float = 1e-3, max_iter: int = 200,
                 classes: int | None = None, balanced: bool = False) -> LogisticRegression:
    """Multinomial logistic regression: features standardized with the rows' mean and spread;
    the loss is the mean cross-entropy (each class weighted by 1/its frequency when
    ``balanced``) plus ``weight_decay`` * ||W||^2, minimized by L-BFGS (convex, so the answer is
    the optimum)."""
    with torch.no_grad():
        f = features.double()
        loc = f.mean(0)
        scale = f.std(0).clamp(min=1e-6) if len(f) > 1 else torch.ones_like(loc)
        f = (f - loc) / scale
        y = labels.long()
        classes = classes or int(y.max()) + 1
        class_weight = None
        if balanced:
            counts = torch.bincount(y, minlength=classes).double()
            class_weight = torch.where(counts > 0, len(y) / (classes * counts.clamp(min=1)), torch.zeros_like(counts))
    weight = torch.zeros(f.shape[1], classes, dtype=torch.float64, device=f.device, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, device=f.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(f @ weight + bias, y, weight=class_weight) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LogisticRegression(weight.detach(), bias.detach(), loc, scale)


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, weight_decay: float = 1e-3, max_iter: int = 200) -> float:
    """Test accuracy of multinomial logistic regression fitted on (train_features, train_labels)
    (``fit_logistic``): the usual probe of a representation (a linear read-out of what the
    features hold)."""
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("features and labels must have the same number of rows")
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    return fit_logistic(train_features, train_labels, weight_decay, max_iter, classes).accuracy(test_features, test_labels)


# ----------------------------------------------------------------------------------------------
# a run directory (what `pyro-vae sample`, `impute`, `anomaly`, ... call)


def open_run(run_dir, device: str = "auto", seed: int = 0, best: bool = False, trust_code: bool = False):
    """(config, model, guide, device) of a run with Pyro's RNG seeded: what every command that
    reads a run starts from (``trust_code``: see ``pyro_vae.run.load_run``)."""
    import pyro

    from pyro_vae.distributed import resolve_device
    from pyro_vae.run import load_run

    pyro.set_rng_seed(seed)
    device = resolve_device(device)
    config, model, guide = load_run(run_dir, device, best=best, trust_code=trust_code)
    return config, model, guide, torch.device(device)


def run_context(model, guide, data, which: str = "test", rows=None) -> dict:
    """The per-row context the programs take (``context_keys``: ``y``, the labels), read from
    a run's data: ``which`` split, the given rows (default all)."""
    keys = context_keys(model, guide)
    if not keys:
        return {}
    labels = getattr(data, f"{which}_labels")
    if labels is None or set(keys) != {"y"}:
        raise DataError(f"the model takes context {list(keys)} and this run's data has no labels to give it")
    return {"y": labels if rows is None else labels[rows]}


def is_image(config, x_dim: int) -> bool:
    """Whether a run's features are an image (its data recorded ``image_shape``)."""
    return config.image_shape is not None and math.prod(config.image_shape) == x_dim


def data_units(data, array):
    """``array`` (points, or any (..., features) tensor) in the data's own units: a run trained
    with ``--standardize`` models standardized features, and what it writes is shown unscaled."""
    standardization = getattr(data, "standardization", None)
    return array if standardization is None else standardization.invert(array)


def save_arrays(path: Path, array) -> Path:
    """One array as ``.npy`` (float32 numbers, rows first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npy(path, torch.as_tensor(array).detach().float().cpu().numpy())
    return path


def impute_run(run_dir, missing: str | None = None, fraction: float = 0.5, n: int = 100, steps: int = 500,
               burn_in: int = 100, method: str = "mwg", seed: int = 0, device: str = "auto", figure=None,
               best: bool = False, trust_code: bool = False) -> dict:
    """``impute`` on the first n test points of a run with ``missing`` features removed (default:
    the bottom half of images, a random half of other features); writes
    ``RUN/impute.json`` (RMSE beside the training-mean baseline, acceptance) and a figure
    (default ``RUN/figures/imputations.png``: for images input, truth, E[x_m | x_o] and one draw;
    for other features a scatter of pairs of features, and ``RUN/imputations.npy``)."""
    from pyro_vae.data import load_run_data
    from pyro_vae.plots import save_image_grid, save_pairs

    run_dir = Path(run_dir)
    config, model, guide, device = open_run(run_dir, device, seed, best, trust_code)
    data = load_run_data(config, device, test_size=n, train_size=None, run_dir=run_dir)
    x = data.test
    missing = missing or ("bottom-half" if config.image_shape else "random")
    if not 0 <= burn_in < steps:
        raise ConfigError(f"--burn-in {burn_in} must lie below --steps {steps}: the draws after it give E[x_m | x_o]")
    observed = ~missing_mask(len(x), x.shape[-1], config.image_shape, missing, fraction, seed).to(x.device)
    r = impute(model, guide, x, observed, steps, burn_in, seed, method, **run_context(model, guide, data))
    baseline = torch.where(observed, x, data.train.mean(0))
    x, baseline = data_units(data, x), data_units(data, baseline)  # RMSE in the data's own units
    r["mean"], r["sample"] = data_units(data, r["mean"]), data_units(data, r["sample"])
    figure = Path(figure or run_dir / "figures" / "imputations.png")
    if is_image(config, x.shape[-1]):
        shown = min(len(x), 16)
        rows = torch.cat([torch.where(observed, x, 0.5)[:shown], x[:shown], r["mean"][:shown], r["sample"][:shown]])
        save_image_grid(rows, figure, config.image_shape, nrow=shown,
                        title=f"input (missing grey), truth, E[x_m | x_o], one draw ({method})")
    else:
        save_arrays(run_dir / "imputations.npy", r["mean"])
        save_pairs(figure, x, {"E[x_m | x_o]": r["mean"], "one draw": r["sample"]},
                   title=f"test points (grey) with missing features imputed ({method})")
    result = {"method": method, "missing": missing, "fraction": fraction if missing == "random" else None,
              "points": len(x), "steps": steps, "burn_in": burn_in, "acceptance": r["acceptance"],
              "rmse_imputed_mean": imputation_error(x, r["mean"], observed),
              "rmse_training_mean": imputation_error(x, baseline, observed), "figure": str(figure)}
    write_json(run_dir / "impute.json", result)
    return result


def anomaly_run(run_dir, k: int = 100, data=None, test_size: int | None = None, seed: int = 0,
                device: str = "auto", figure=None, best: bool = False, trust_code: bool = False) -> dict:
    """``anomaly_scores`` of a run's whole test set (every class, even those left out of training
    with ``classes``) and, with ``data`` (a .npy/.pt file), of those points. Reports the AUROC of
    the classes not trained on against those trained on, and of ``data`` against the test set.
    Writes ``RUN/anomaly.json``, ``RUN/anomaly_scores.npz`` and a figure of the 32 test points
    that score highest (default ``RUN/figures/anomalies.png``; a scatter of pairs of features
    where the features are not an image)."""
    from pyro_vae.data import load_points, load_run_data
    from pyro_vae.plots import save_image_grid, save_pairs

    run_dir = Path(run_dir)
    config, model, guide, device = open_run(run_dir, device, seed, best, trust_code)
    test = load_run_data(config, device, test_size=test_size, all_classes=True, run_dir=run_dir)
    x = test.test
    context = run_context(model, guide, test)
    points = None
    if data is not None:  # checked before the long scoring, so a wrong file fails at once
        if context:
            raise DataError(f"--data has no labels, and this run's model takes {list(context)}: score its test set only")
        points = load_points(data, x.shape[-1], model=model, standardization=test.standardization).to(x.device)
    shift = test.standardization.log_jacobian if test.standardization is not None else 0.0
    scores = anomaly_scores(model, guide, x, k, seed, **context) - shift  # -log p(x) in the data's units
    result: dict = {"k": k, "test_points": len(x), "median_score": float(np.median(scores)),
                    "score_99th_percentile": float(np.percentile(scores, 99))}
    arrays = {"test_scores": scores}
    if config.classes is not None:
        normal = torch.isin(test.test_labels, torch.as_tensor(config.classes, device=x.device)).cpu().numpy()
        if normal.all():
            raise DataError("the run was trained on every class in the test set: no class is left to detect")
        result.update(trained_classes=config.classes, normal_points=int(normal.sum()),
                      anomalous_points=int((~normal).sum()), auroc_other_classes=auroc(scores[normal], scores[~normal]))
        arrays["test_is_anomalous"] = ~normal
    if points is not None:
        arrays["data_scores"] = anomaly_scores(model, guide, points, k, seed) - shift
        result.update(data=str(data), data_points=len(points), auroc_data=auroc(scores, arrays["data_scores"]))
    top = np.argsort(-scores)[:32]
    result["most_anomalous_test_points"] = top.tolist()
    figure = Path(figure or run_dir / "figures" / "anomalies.png")
    title = f"the {len(top)} test points of highest -log p(x) (k={k})"
    if is_image(config, x.shape[-1]):
        save_image_grid(x[torch.as_tensor(top.copy(), device=x.device)], figure, config.image_shape, title=title)
    else:
        layers = {f"highest {len(top)} -log p(x)": x[torch.as_tensor(top.copy(), device=x.device)]}
        if points is not None:
            layers["--data"] = points
        save_pairs(figure, x, layers, title=title + ", test points in grey")
    result["figure"] = str(figure)
    save_npz(run_dir / "anomaly_scores.npz", **arrays)
    write_json(run_dir / "anomaly.json", result)
    return result


def represent_run(run_dir, labels=(100, 1000, 10000), seed: int = 0, device: str = "auto", best: bool = False,
                  trust_code: bool = False) -> dict:
    """Representation learning: the test accuracy of a linear probe (``linear_probe``) on the
    codes E_q[z|x] (``latent_codes``, every site side by side) of a run's training and test
    data, with ``labels`` labelled training rows each (balanced over classes), beside the same
    probe on the raw features. Writes ``RUN/represent.json``."""
    from pyro_vae.data import load_run_data

    run_dir = Path(run_dir)
    config, model, guide, device = open_run(run_dir, device, seed, best, trust_code)
    data = load_run_data(config, device, train_size=config.train_size)
    if data.train_labels is None or data.test_labels is None:
        raise DataError(f"a linear probe needs labels, and {config.dataset!r} has none")
    if run_context(model, guide, data):
        raise ProgramError("a linear probe reads codes of unlabelled points, and this run's model takes the label "
                         "as context: probe an unconditional run")
    codes_test = latent_codes(model, guide, data.test).flat()
    rows = []
    for n in labels:
        chosen = data.keep_labels(n, seed).labelled_rows
        x, y = data.batch(chosen), data.train_labels[chosen]  # binarized as in training, where it was
        rows.append({"labels": n,
                     "latent_accuracy": linear_probe(latent_codes(model, guide, x).flat(), y, codes_test,
                                                     data.test_labels),
                     "raw_accuracy": linear_probe(x, y, data.test, data.test_labels)})
    result = {"latent_dims": codes_test.shape[1], "raw_dims": data.train.shape[1], "test_points": len(data.test),
              "probe": "multinomial logistic regression, standardized features, L-BFGS, weight decay 1e-3",
              "rows": rows}
    write_json(run_dir / "represent.json", result)
    return result


def disentangle_run(run_dir, points: int = 20_000, seed: int = 0, device: str = "auto", best: bool = False,
                    trust_code: bool = False, span: float = 3.0, steps: int = 9, index: int = 0,
                    chunk: int = 2000) -> dict:
    """The disentanglement metrics (``pyro_vae.disentanglement.all_metrics``) of a run's codes
    E_q[z|x] (``latent_codes``, every site side by side) on ``points`` test rows of data that
    carry factor labels (``dsprites`` or the dSprites ``.npz``), the reconstruction term
    -E_q log p(x|z) on up to 2,000 of them (``evaluate``, 10 particles), the total correlation of
    the aggregate posterior on up to 5,000 (``objectives.tc.total_correlation``), and a traversal figure
    of test point ``index`` with one row per code, labelled by the factor it shares most
    information with (``RUN/figures/disentangle_traversals.png``). Writes ``RUN/disentangle.json``."""
    from pyro_vae.data import load_run_data
    from pyro_vae.disentanglement import all_metrics, captured_factor
    from pyro_vae.objectives.tc import NotFactorizedError, total_correlation
    from pyro_vae.plots import save_image_grid

    run_dir = Path(run_dir)
    config, model, guide, device = open_run(run_dir, device, seed, best, trust_code)
    data = load_run_data(config, device, test_size=points, run_dir=run_dir)
    if data.test_factors is None:
        raise DataError(f"the data of this run ({config.dataset!r}) carry no factor labels, which the metrics "
                         f"compare the codes with: train on --dataset dsprites or the dSprites .npz file")
    if run_context(model, guide, data):
        raise ProgramError("the disentanglement metrics read codes of unlabelled points, and this run's model takes "
                         "labels as context: measure an unconditional run")
    x, factors = data.test, data.test_factors
    codes = torch.cat([latent_codes(model, guide, x[i : i + chunk], seed=seed).flat() for i in range(0, len(x), chunk)])
    result = {"points": len(x), "latent_dims": codes.shape[1], "factor_names": list(data.factor_names),
              **all_metrics(codes.cpu(), factors.cpu(), seed=seed)}
    result["reconstruction"] = float(evaluate(model, guide, x[:2000], k=10, psis=False, seed=seed)["distortion"])
    try:  # what beta-TCVAE penalizes, where the guide factorizes
        result["total_correlation"] = total_correlation(model, guide, x[:5000], seed=seed)
    except NotFactorizedError:
        result["total_correlation"] = None
    names = captured_factor(result["mutual_information"], data.factor_names, codes.cpu())
    result["captured_factor"] = names
    mi = np.asarray(result["mutual_information"]).max(1)
    dims = [int(d) for d in np.argsort(-mi)]  # the most informative codes first
    if is_image(config, x.shape[-1]):
        grid = traverse(model, guide, x[index : index + 1], dims, span, steps)[0]
        out = save_image_grid(grid.reshape(-1, x.shape[-1]), run_dir / "figures" / "disentangle_traversals.png",
                              config.image_shape, nrow=steps, row_labels=[f"z{d}: {names[d]}" for d in dims],
                              title=f"test point {index}: each code from -{span:g} to {span:g}, labelled by the "
                                    f"factor it shares most information with")
        result["traversal_figure"] = str(out)
    write_json(run_dir / "disentangle.json", result)
    return result
