"""Checks on user data, each failing with a message that names the problem and the fix."""

from __future__ import annotations

import math

import torch

from pyro_vae import sites
from pyro_vae.errors import DataError


def check_finite(x: torch.Tensor, what: str) -> None:
    """x must hold values and no NaN or infinity. Checked in chunks of ``CHECK_CHUNK`` values:
    ``torch.isfinite`` on a whole data set would take about twice its memory again."""
    if x.numel() == 0:
        raise DataError(f"{what} is empty: there is nothing to train or evaluate on.")
    rows = x.reshape(len(x), -1) if x.dim() else x.reshape(1, 1)
    step = max(1, CHECK_CHUNK // max(1, rows.shape[1]))
    bad_rows = torch.cat([(~torch.isfinite(rows[i:i + step])).sum(1) for i in range(0, len(rows), step)])
    if bad_rows.any():
        first = int(bad_rows.nonzero()[0])
        raise DataError(
            f"{what} holds {int(bad_rows.sum())} NaN or infinite values in {int((bad_rows > 0).sum())} rows "
            f"(first: row {first}). Remove or impute those rows (e.g. torch.nan_to_num) first."
        )


def check_features(x: torch.Tensor, x_dim: int, owner: str) -> None:
    """x must be a (batch, x_dim) tensor of flat data points."""
    if x.dim() != 2 or x.shape[-1] != x_dim:
        got = x.shape[-1] if x.dim() else "?"
        raise DataError(
            f"{owner} expects data of shape (batch, {x_dim}), got {tuple(x.shape)}. Flatten each "
            f"data point to {x_dim} features, or build the model for this data (x_dim={got})."
        )


# ---------------------------------------------------------------------------------------------
# the data against the distribution the model actually uses

CHECK_CHUNK = 1 << 22  # values per chunk of the whole-tensor support check
SCALE_RANGE = (0.01, 5.0)  # typical feature scales outside this range get the --standardize hint


class DataScaleWarning(UserWarning):
    """Data far from unit scale under a Gaussian or Laplace observation: --standardize helps."""


def observed_sites(model, x: torch.Tensor, rows: int = 2, guide=None, **context) -> dict:
    """The observed sample sites of one trace of ``model`` on the first ``rows`` rows of x (and of
    the context tensors): {name: site}, each with ``site["fn"]`` and ``site["value"]``. With a
    ``guide``, the model is replayed on the guide's draws (as every estimator runs it); without,
    its latents come from its own prior. Traced
    under ``poutine.block`` (nothing reaches an enclosing handler), without gradients or Pyro's
    validation (so a mismatch gets this module's message, not a raw one), on a fork of the RNG
    (a seeded run draws the same numbers with or without the check)."""
    import pyro
    from pyro import poutine

    rows_ctx = {k: (v[:rows] if torch.is_tensor(v) and v.dim() and len(v) == len(x) else v)
                for k, v in context.items()}
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices), torch.no_grad(), pyro.validation_enabled(False), poutine.block():
        if guide is not None:
            model = poutine.replay(model, trace=poutine.trace(guide).get_trace(x[:rows], **rows_ctx))
        trace = poutine.trace(model).get_trace(x[:rows], **rows_ctx)  # leaves the RNG streams as they were
    return {site["name"]: site for site in sites.observed_sites(trace)
            if not site["infer"].get("_do_not_score") and site["value"].numel() > 0}


def data_site(model, x: torch.Tensor, rows: int = 2, guide=None, **context) -> tuple[str, dict] | None:
    """(name, site) of the observed site whose value is the data x (its first ``rows`` rows, in
    any shape), else of the only observed site; None where the model observes nothing."""
    sites = observed_sites(model, x, rows, guide, **context)
    head = x[:rows].reshape(-1)
    for name, site in sites.items():
        value = site["value"]
        if value.numel() == head.numel() and torch.equal(value.reshape(-1).to(head.dtype), head):
            return name, site
    return next(iter(sites.items())) if len(sites) == 1 else None


def elementwise_support(support):
    """The per-value constraint of ``support`` where it needs no parameter of the distribution
    (boolean, unit_interval, real, positive, integer_interval(0, 255), ...), else None.
    ``independent(c, n)`` is unwrapped to c; a constraint holding a tensor of more than one value
    (Binomial's integer_interval(0, total_count)) depends on the parameters."""
    from torch.distributions import constraints

    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if support.event_dim != 0 or isinstance(support, constraints._Dependent):
        return None
    if any(torch.is_tensor(v) and v.numel() > 1 for v in vars(support).values()):
        return None
    return support


def describe_support(support) -> str:
    """A constraint in words: boolean -> '{0, 1}', unit_interval -> '[0, 1]', ..."""
    from torch.distributions import constraints

    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if hasattr(support, "describe"):
        return support.describe()
    if support is constraints.boolean:
        return "{0, 1}"
    if support is constraints.real:
        return "all reals"
    lo, hi = (_g(getattr(support, k, None)) for k in ("lower_bound", "upper_bound"))
    if isinstance(support, constraints.integer_interval):
        return f"the integers {lo}..{hi}"
    if isinstance(support, type(constraints.nonnegative_integer)):  # integers >= a bound
        return f"the integers >= {lo}"
    if isinstance(support, constraints.interval):
        return f"[{lo}, {hi}]"
    if isinstance(support, constraints.half_open_interval):
        return f"[{lo}, {hi})"
    if isinstance(support, constraints.greater_than):
        return f"({lo}, inf)"
    if isinstance(support, constraints.greater_than_eq):
        return f"[{lo}, inf)"
    return str(support)


def _g(v) -> str:
    if torch.is_tensor(v):
        return f"{float(v.min()):g}" if v.numel() == 1 or bool((v == v.min()).all()) else "(per value)"
    return f"{v:g}" if isinstance(v, (int, float)) else str(v)


def check_data_support(model, x: torch.Tensor, what: str = "data", binarized: bool = False, guide=None,
                       **context) -> None:
    """Raise DataError unless every row of x lies in the support of the model's observed site.

    The model is traced once on the first rows (``data_site``; replayed on ``guide``'s draws
    where one is given). Where the site's support needs
    no parameters (``elementwise_support``) the whole of x is checked against it, in chunks
    of ``CHECK_CHUNK`` values, without running the model again; otherwise only the traced rows
    are checked, against the traced distribution's own support. ``binarized``: x holds the
    probabilities of dynamically binarized data (each batch is Bernoulli(x)), so x must lie in
    [0, 1] and the draws, 0 and 1, in the support.
    """
    found = data_site(model, x, guide=guide, **context)
    if found is None:
        return
    name, site = found
    fn = site["fn"]
    support = fn.support
    label = f"site {name!r} ({type(base_distribution(fn)).__name__}, values in {describe_support(support)})"
    fix = ("Rescale the data into that range (e.g. x / 255 for 8-bit images, binarize for {0, 1}), "
           "or use a likelihood for such data (--likelihood gaussian for real values, or another "
           "distribution in your model).")
    if binarized:
        _check_range(x, lambda v: (v >= 0) & (v <= 1), f"{what} (probabilities of binarized data)", "[0, 1]")
        x = torch.tensor([0.0, 1.0], device=x.device)[:, None]  # what each batch holds
    per_value = elementwise_support(support)
    if per_value is None:  # the support depends on the parameters: the traced rows only
        value = site["value"]
        ok = support.check(value)
        if not bool(ok.all()):
            raise DataError(f"{what} lies outside the support of the model's observed {label}: the first "
                            f"rows hold values over [{float(value.min()):g}, {float(value.max()):g}]. {fix}")
        return
    _check_range(x, per_value.check, what, label, fix)


def _check_range(x: torch.Tensor, check, what: str, label: str, fix: str = "") -> None:
    """Chunked elementwise check of every value of x; one-line DataError with the offending range."""
    flat = x.reshape(len(x), -1) if x.dim() else x.reshape(1, 1)
    step = max(1, CHECK_CHUNK // max(1, flat.shape[1]))
    bad_count, first, lo, hi = 0, None, math.inf, -math.inf
    for i in range(0, len(flat), step):
        chunk = flat[i:i + step]
        bad = ~check(chunk)
        n = int(bad.sum())
        if n:
            values = chunk[bad]
            bad_count += n
            lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
            if first is None:
                first = i + int(bad.any(1).nonzero()[0])
    if bad_count:
        needs = label if label.startswith("[") else f"the model's observed {label}"
        raise DataError(f"{what} holds {bad_count} values outside {needs} (they range over "
                        f"[{lo:g}, {hi:g}]; first in row {first}). {fix}".rstrip())


def base_distribution(fn):
    """The distribution under Independent / masked / expanded wrappers."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def check_data_scale(model, x: torch.Tensor, what: str = "training data", guide=None, **context) -> str | None:
    """Warn (``DataScaleWarning``) when x is far from unit scale under a Gaussian or Laplace
    observation, and return the message (None when the scale is fine or the observation is
    another distribution).

    The typical scale is the median over features of the root mean square sqrt(mean_n x_nd^2)
    (features that are all zero left out): the decoder starts near 0 and the observation scale
    near 0.1, so data of scale s >> 1 (or << 1) cost many steps before the fit begins. Outside
    ``SCALE_RANGE`` the hint suggests --standardize (log p(x) is still reported in the data's units).
    """
    import warnings

    import pyro.distributions as dist

    found = data_site(model, x, guide=guide, **context)
    if found is None or not isinstance(base_distribution(found[1]["fn"]), (dist.Normal, dist.Laplace)):
        return None
    flat = x.reshape(len(x), -1).double()
    rms = flat.pow(2).mean(0).sqrt()
    rms = rms[rms > 0]
    if not len(rms):
        return None
    scale = float(rms.median())
    lo, hi = SCALE_RANGE
    if lo <= scale <= hi:
        return None
    sd = flat.std(0, unbiased=False)
    message = (f"{what} have feature scale ~{scale:.3g} (root mean square; standard deviations "
               f"{float(sd.min()):.3g} to {float(sd.max()):.3g}), far from 1 under the model's "
               f"{type(base_distribution(found[1]['fn'])).__name__} observation: add --standardize (log p(x) is "
               f"still reported in the data's own units).")
    warnings.warn(message, DataScaleWarning, stacklevel=2)
    return message
