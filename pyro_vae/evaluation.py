"""Honest evaluation of a trained model: importance-sampled log-likelihood, the ELBO split into
distortion and rate, latent diagnostics, and PSIS diagnostics of the guide through ArviZ.

log p(x) ~= log (1/k) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016, eq. 9):
a lower bound in expectation that tightens as k grows, with the guide as proposal. The same
weights give the k-sample ELBO estimate mean_k log w_k, its split -ELBO = distortion + rate
(Alemi et al. 2018), the Pareto k-hat of each point's weights (PSIS; Vehtari et al. 2024,
Yao et al. 2018) and their effective sample size, all from one pass.

Reproducibility: every latent draw comes from a generator seeded by (seed, site, data point,
block of ``PARTICLE_BLOCK`` particles) (``BlockNoise``), so each (point, particle) gets the
same z however the work is chunked; per-point figures are computed from each point's full
vector of k log weights, never from partial sums.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from pyro_vae.checks import check_data_support, check_finite
from pyro_vae.errors import ConfigError, ProgramError
from pyro_vae.files import atomic_write, save_npz, write_json
from pyro_vae.likelihoods import bits_per_dim
from pyro_vae.objectives.base import (
    PARTICLE_PLATE,
    REPEATED,
    VECTORIZED,
    _reduce,
    find_data_plate,
    guess_max_plate_nesting,
    particle_layout,
    site_log_prob,
    traces,
)
from pyro_vae.objectives.kl import site_kl, site_kls
from pyro_vae.programs import context_keys
from pyro_vae.sites import is_latent, observed_sites

LN2 = math.log(2.0)
PARTICLE_BLOCK = 128  # particles per seeded noise block; particle chunks are multiples of it
# On a CPU, chunks of a few thousand pairs keep the decoder's (particles, points, D) tensors in
# cache: measured 1.8x less CPU time than 50,000-pair chunks for the iwae1 model at k=5000.
CPU_CHUNK_PAIRS = 4096
KHAT_BAD = 0.7  # Vehtari et al. 2024: above this the importance-sampling estimate is unreliable
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------
# chunk-invariant random draws


def _splitmix64(*values: int) -> int:
    """A 63-bit seed mixing the given integers (splitmix64 finaliser, chained)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h >> 1


def _location_scale(fn):
    """(loc, scale_or_tril, kind) of a Normal / MultivariateNormal site distribution, else None."""
    while isinstance(fn, (dist.Independent, dist.MaskedDistribution)):
        fn = fn.base_dist
    if isinstance(fn, dist.Normal):
        return fn.loc, fn.scale, "normal"
    if isinstance(fn, dist.MultivariateNormal):
        return fn.loc, fn.scale_tril, "mvn"
    return None


_WARNED: set = set()


class BlockNoise(Messenger):
    """Sample every latent site of a Gaussian guide from noise that depends only on
    (seed, site name, global data index, particle index).

    The noise of data point ``i`` and particles ``[b * B, (b + 1) * B)`` (``B = PARTICLE_BLOCK``)
    is ``randn`` from a generator seeded with hash(seed, site, i, b), so a chunk of points and
    particles draws exactly what the unchunked run draws for them. Sites must sit inside the
    ``data`` plate (and the particle plate, if any). Normal and MultivariateNormal sites are
    reparameterised (loc + scale * eps), low-rank Gaussians as loc + W eps_w + sqrt(d) eps_d
    (two noise streams, as torch draws them), and a flow on a Gaussian (``iaf``) by pushing its
    base draw through the transforms; other families fall back to Pyro's global RNG with a
    warning, and lose the chunk invariance.

    Use it outside the particle and data plates (``with BlockNoise(...): traces(...)``), so the
    plates have broadcast each site's distribution before it draws.
    """

    def __init__(self, seed: int, data_index, particle_offset: int = 0, repeats: int = 0):
        super().__init__()
        self.seed = int(seed)
        self.data_index = [int(i) for i in data_index]
        self.particle_offset = int(particle_offset)
        self.repeats = int(repeats)  # REPEATED layout: the data dim holds ``repeats`` copies of the points
        self._generators: dict = {}

    @property
    def rows(self) -> int:
        """Entries of the data dim: the points, or in the REPEATED layout particles x points."""
        return len(self.data_index) * max(1, self.repeats)

    def _generator(self, device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        return self._generators[key]

    def noise(self, site: str, shape, data_dim: int, particle_dim: int | None, device, dtype):
        """Standard normal noise of ``shape`` (data and particle dims at the given positions)."""
        shape = list(shape)
        n_particles = shape[particle_dim] if particle_dim is not None else max(1, self.repeats)
        rest = [s for a, s in enumerate(shape) if a not in (data_dim, particle_dim)]
        if shape[data_dim] != self.rows:
            raise ValueError(f"site {site!r} has {shape[data_dim]} data points, BlockNoise was given "
                             f"{self.rows} rows")
        first = self.particle_offset // PARTICLE_BLOCK
        last = (self.particle_offset + n_particles - 1) // PARTICLE_BLOCK
        start = self.particle_offset - first * PARTICLE_BLOCK
        out = torch.empty(len(self.data_index), (last - first + 1) * PARTICLE_BLOCK, *rest,
                          device=device, dtype=dtype)
        g, site_key = self._generator(device), zlib.crc32(site.encode())
        for row, i in enumerate(self.data_index):
            for col, b in enumerate(range(first, last + 1)):
                g.manual_seed(_splitmix64(self.seed, site_key, i, b))
                torch.randn(PARTICLE_BLOCK, *rest, generator=g, device=device, dtype=dtype,
                            out=out[row, col * PARTICLE_BLOCK:(col + 1) * PARTICLE_BLOCK])
        eps = out[:, start:start + n_particles]
        if particle_dim is None and self.repeats:  # row j * B + i: point i's particle j, as vectorized
            return torch.movedim(eps.transpose(0, 1).reshape(-1, *rest), 0, data_dim)
        if particle_dim is None:
            return torch.movedim(eps[:, 0], 0, data_dim)
        return torch.movedim(eps, (0, 1), (data_dim, particle_dim))

    def _pyro_sample(self, msg):
        if (msg["is_observed"] or msg["value"] is not None or msg["infer"].get("enumerate")
                or site_is_subsample(msg)):
            return
        fn = msg["fn"]
        batch = len(fn.batch_shape)
        dims = {f.name: batch + f.dim for f in msg["cond_indep_stack"]}
        data_plate = self._data_plate(msg)
        if data_plate is None:
            raise ProgramError(f"latent site {msg['name']!r} is not inside a plate over the "
                             f"{self.rows} data points: evaluation needs per-data-point "
                             f"latents (as in VAEs)")
        dims["data"] = dims[data_plate]
        value = self._draw(msg["name"], fn, dims)
        if value is None:
            if (msg["name"], type(fn)) not in _WARNED:  # once per site and family, not per chunk
                _WARNED.add((msg["name"], type(fn)))
                warnings.warn(f"site {msg['name']!r} has a {type(fn).__name__} distribution; its draws "
                              f"use the global RNG, so chunked and unchunked evaluation differ",
                              stacklevel=2)
            return
        # the same tensor where no broadcast is needed: a flow's transforms cache it for log_prob
        msg["value"] = value if value.shape == fn.shape() else value.expand(fn.shape())

    def _data_plate(self, msg) -> str | None:
        """The plate over the data points: of the site's plates of that size, the one named
        ``data`` if there is one, else the outermost."""
        frames = sorted((f for f in msg["cond_indep_stack"]
                         if f.name != PARTICLE_PLATE and f.size == self.rows), key=lambda f: f.dim)
        names = [f.name for f in frames]
        return "data" if "data" in names else (names[0] if names else None)

    def _draw(self, name: str, fn, dims: dict):
        """A reparameterised draw of ``fn`` from the block noise, or None for other families."""
        transforms = []
        if isinstance(fn, dist.TransformedDistribution):
            transforms, fn = fn.transforms, fn.base_dist

        def eps(key, shape, like):
            return self.noise(key, shape, dims["data"], dims.get(PARTICLE_PLATE), like.device, like.dtype)

        params = _location_scale(fn)
        if params is not None:
            loc, scale, kind = params
            e = eps(name, fn.shape(), loc)
            value = loc + scale * e if kind == "normal" else loc + (scale @ e.unsqueeze(-1)).squeeze(-1)
        elif isinstance(fn, torch.distributions.LowRankMultivariateNormal):
            e_w = eps(f"{name}/factor", fn.batch_shape + fn.cov_factor.shape[-1:], fn.loc)
            e_d = eps(name, fn.shape(), fn.loc)
            value = fn.loc + (fn.cov_factor @ e_w.unsqueeze(-1)).squeeze(-1) + fn.cov_diag.sqrt() * e_d
        else:
            return None
        for transform in transforms:  # a flow: the base draw pushed through (and cached for log_prob)
            value = transform(value)
        return value


# ----------------------------------------------------------------------------------------------
# PSIS through ArviZ (0.2x: arviz.psislw; 1.x: arviz_stats)


PSIS_MIN_DRAWS = 25  # the right tail is S/5 draws (below 225 draws), and a fit needs 5


def psislw(log_weights: np.ndarray, r_eff: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed log weights and k-hat along the last axis (Vehtari et al. 2024).

    Works with arviz 0.2x (``arviz.psislw``) and with arviz 1.x, where PSIS lives in
    ``arviz_stats`` (whose ``psislw`` takes log-*likelihood* values and negates them, so the
    log weights are passed negated).

    With fewer than ``PSIS_MIN_DRAWS`` weights the tail is too short to fit (under 5 draws):
    the weights are only normalized and k-hat is inf, as arviz 0.2x reports (1.x raises).
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    if log_weights.shape[-1] < PSIS_MIN_DRAWS:
        normalized = log_weights - np.logaddexp.reduce(log_weights, axis=-1, keepdims=True)
        return normalized, np.full(log_weights.shape[:-1], np.inf)
    try:
        from arviz_stats.base import array_stats
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import arviz as az
        lw, khat = az.psislw(log_weights, reff=r_eff)
        return np.asarray(lw), np.asarray(khat)
    lw, khat = array_stats.psislw(-log_weights, r_eff=r_eff, axis=-1)
    return np.asarray(lw), np.asarray(khat)


def _inference_data(groups: dict, coords: dict, dims: dict):
    """``arviz.from_dict`` for arviz 0.2x (keyword groups) and 1.x (a dict of groups)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az
    if int(az.__version__.split(".")[0]) >= 1:
        return az.from_dict(groups, coords=coords, dims=dims)
    return az.from_dict(**groups, coords=coords, dims=dims)


# ----------------------------------------------------------------------------------------------
# per-chunk quantities


def _factorized(fn):
    """The elementwise base of an ``Independent`` site distribution (log_prob per dimension)."""
    while isinstance(fn, dist.Independent):
        fn = fn.base_dist
    return fn if fn.event_shape == () else None


def _per_dim(t: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Sum a (particles, data, ...dims) tensor over particles and data -> flat per-dim vector."""
    return t.reshape(-1, *t.shape[batch_dims:]).sum(0).reshape(-1).double()


def _rows_kb(lp, k: int, b: int) -> torch.Tensor:
    """A site's log-density in the REPEATED layout, (K * B, inner plates...), -> (K, B)."""
    if not torch.is_tensor(lp) or lp.dim() == 0 or lp.shape[0] != k * b:
        raise ProgramError("a program that does not broadcast over particles must keep every latent inside "
                         "the data plate to be evaluated with k > 1 (its batch is repeated per particle)")
    return lp.reshape(k * b, -1).sum(1).reshape(k, b)


def particle_layout_for(model, guide, x, context) -> tuple[str, int]:
    """(layout, plates): how ``_Chunk`` lays out particles for these programs (``particle_layout``:
    vectorized where they broadcast, else the batch repeated per particle), decided on two rows."""
    head = (x[:2],), context_rows(context, 0, 2)
    plates = guess_max_plate_nesting(model, guide, *head)
    return particle_layout(model, guide, *head, plates), plates


class _Chunk:
    """Log weights and the ELBO's parts for one chunk of data points x particles.

    Every site's log-density is computed once: per dimension for factorized (``Independent``)
    sites, whose sums give the site's total, and the weights log w = log p(x|z) + sum_s
    [log p(z_s|.) - log q(z_s|.)] are assembled from them.
    """

    def __init__(self, model, guide, xb, num_particles, noise, closed_form: bool, layout=(VECTORIZED, 1),
                 **context):
        layout, plates = layout
        with noise:
            model_trace, guide_trace = traces(model, guide, xb, num_particles, plates, layout, **context)
        k, b = num_particles, xb.shape[0]
        if layout == REPEATED:
            def _shape_kb(lp, k, b):
                return _rows_kb(lp, k, b)
        else:
            data_dim = find_data_plate(model_trace).dim

            def _shape_kb(lp, k, b):  # sum every plate but the particles' and the data's
                return _reduce(lp, -(plates + 1), data_dim, (k, b))
        self.log_lik = sum(_shape_kb(site_log_prob(s), k, b) for s in observed_sites(model_trace))
        self.log_w = self.log_lik
        self.sites = {}
        kls = site_kls(model_trace, guide_trace, per_dimension=True) if closed_form else {}
        for name, g in guide_trace.nodes.items():
            if not is_latent(g):
                continue
            m, v = model_trace.nodes[name], g["value"]
            qf, pf = _factorized(g["fn"]), _factorized(m["fn"])
            plain = all(s["mask"] is None and s["scale"] == 1.0 for s in (g, m))
            batch = len(g["fn"].batch_shape)
            per_dim, method = None, "monte carlo"
            if qf is not None and pf is not None and plain:
                lq, lp = qf.log_prob(v), pf.log_prob(v)
                log_q = lq.reshape(*lq.shape[:batch], -1).sum(-1)
                log_p = lp.reshape(*lp.shape[:batch], -1).sum(-1)
                per_dim = _per_dim(lq - lp, batch)
            else:
                log_q, log_p = site_log_prob(g), site_log_prob(m)
            total = _shape_kb(log_q - log_p, k, b)
            self.log_w = self.log_w - total
            method, kl = kls.get(name, (method, None))
            if kl is not None:  # valid here (objectives/kl.py); else the Monte Carlo KL stays
                total = _shape_kb(site_kl(m, g, kl.reshape(*kl.shape[:batch], -1).sum(-1)), k, b)
                per_dim = _per_dim(kl, batch) if plain and kl.dim() > batch else None
            self.sites[name] = {"total": total, "per_dim": per_dim, "method": method, "value": v}


# ----------------------------------------------------------------------------------------------
# memory: measure the peak of one probe chunk, derive chunk sizes from a bound


def parse_bytes(text) -> int:
    """'2GB', '512MB', '1.5G', '100000' (bytes) -> a positive number of bytes."""
    size = _parse_bytes(text)
    if not size > 0:
        raise ConfigError(f"--max-memory {text}: the memory bound must be positive, e.g. 2GB or 512MB")
    return size


def _parse_bytes(text) -> int:
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().upper().replace("IB", "B")
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "K": 2**10, "M": 2**20,
             "G": 2**30, "T": 2**40, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise ConfigError(f"--max-memory {text}: cannot read a memory size; write e.g. 2GB, 512MB or a number "
                          f"of bytes") from None


def peak_memory_bytes(fn, device) -> tuple[object, int]:
    """Run ``fn()``; return (its result, peak bytes allocated by torch while it ran).

    CUDA: ``torch.cuda.max_memory_allocated``; CPU: the running sum of the allocation events
    and frees the torch profiler records (``profile_memory=True``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), _native_stderr_silenced():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        # allocations are the ops' self memory, frees are "[memory]" events with negative sizes
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
    running = itertools.accumulate((e.self_cpu_memory_usage for e in events), initial=0)
    return out, max(running)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send file descriptor 2 to /dev/null for a moment: the profiler's C++ side (kineto) logs
    "profiler_start" lines, and on a CUDA build without a GPU an "ERROR ... gpuGetDeviceCount
    failed" line, that mean nothing to someone evaluating on a CPU."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def plan_chunks(k: int, n: int, pairs: int) -> tuple[int, int]:
    """(data points, particles) per chunk with at most ``pairs`` (point, particle) pairs in flight
    (at least one noise block). Particle chunks are whole multiples of ``PARTICLE_BLOCK``, of
    near-equal size."""
    if k <= pairs:
        return max(1, min(n, pairs // k)), k
    widest = max(PARTICLE_BLOCK, pairs // PARTICLE_BLOCK * PARTICLE_BLOCK)
    parts = math.ceil(k / widest)
    return 1, math.ceil(k / parts / PARTICLE_BLOCK) * PARTICLE_BLOCK


def context_rows(context: dict, start: int, stop: int) -> dict:
    """The context tensors (e.g. labels y) of data rows start:stop."""
    return {k: v[start:stop] for k, v in context.items()}


def _noise(seed, data_index, particle_offset, num_particles, layout) -> BlockNoise:
    """The chunk's seeded noise for the particle layout (the same draws in either layout)."""
    return BlockNoise(seed, data_index, particle_offset, num_particles if layout[0] == REPEATED else 0)


def bytes_per_pair(model, guide, x, k: int, seed: int = 0, layout=None, **context) -> float:
    """Measured peak bytes per (data point, particle) pair of one probe chunk, plus what the
    evaluation keeps per pair (log weights, PSIS's float64 copies)."""
    b, p = min(len(x), 4), min(k, PARTICLE_BLOCK)
    layout = layout or particle_layout_for(model, guide, x, context)
    noise = _noise(seed, range(b), 0, p, layout)
    _, peak = peak_memory_bytes(lambda: _Chunk(model, guide, x[:b], p, noise, False, layout,
                                               **context_rows(context, 0, b)), x.device)
    return peak / (b * p) + 4 + 6 * 8


# ----------------------------------------------------------------------------------------------
# the evaluation


@torch.no_grad()
def evaluate(model, guide, x, k: int = 1000, max_batch_particles: int = 100_000,
             progress: bool = False, *, max_memory=None, seed: int = 0, psis: bool = True,
             data_chunk: int | None = None, particle_chunk: int | None = None,
             return_points: bool = False, **context) -> dict:
    """Every figure of the evaluation of ``model``/``guide`` on the rows of ``x``, as a dict.

    - ``test_log_likelihood`` (nats, mean over points of log (1/k) sum_k w_k), ``test_nll``,
      ``test_bits_per_dim`` (= nll / (D ln 2), D the dimensions the model scores: ``model.scored_dims``
      where it sets one, such as the hidden pixels of ``cvae-quadrant``, else all); ``test_elbo`` (mean log w) and the ELBO split:
      ``distortion`` = -E_q log p(x|z), ``rate`` = KL(q(z|x) || p(z)) per site and per latent
      dimension (closed form per site where ``objectives.kl`` finds it valid; Monte Carlo with
      the same particles otherwise; ``kl_method`` says which, with the reason).
    - ``pareto_k`` summary (PSIS, r_eff = 1 for independent draws) and ``share_khat_above_0.7``;
      ``ess`` of the raw weights (sum w)^2 / sum w^2 (Kish), mean and as a share of k.

    Chunking: ``max_memory`` (bytes, or '1GB') bounds the working memory from a measured probe
    chunk; otherwise at most ``max_batch_particles`` pairs are in flight; on a CPU at most
    ``CPU_CHUNK_PAIRS`` as well (cache-sized chunks are faster there). ``data_chunk`` and
    ``particle_chunk`` force the chunk shape (tests). Results do not depend on the chunking:
    draws are seeded per (point, particle block) by ``BlockNoise``.
    """
    if k < 1:
        raise ConfigError(f"k = {k}: the importance samples per point must be at least 1")
    check_finite(x, "the data to evaluate")
    check_data_support(model, x, "the data to evaluate", guide=guide, **context)  # once, before any chunk
    with pyro.validation_enabled(False):  # Pyro's argument checks cost time per chunk
        return _evaluate(model, guide, x, k, max_batch_particles, progress, max_memory, seed, psis,
                         data_chunk, particle_chunk, return_points, **context)


def _evaluate(model, guide, x, k, max_batch_particles, progress, max_memory, seed, psis,
              data_chunk, particle_chunk, return_points, **context) -> dict:
    t0 = time.perf_counter()
    n = len(x)
    closed_form = True  # per site where valid: objectives/kl.py decides
    layout = particle_layout_for(model, guide, x, context)
    if max_memory is not None:
        per_pair = bytes_per_pair(model, guide, x, k, seed, layout=layout, **context)
        pairs = max(1, int(parse_bytes(max_memory) / per_pair))
    else:
        per_pair, pairs = None, max_batch_particles
    if x.device.type == "cpu":
        pairs = min(pairs, CPU_CHUNK_PAIRS)
    dc, pc = plan_chunks(k, n, pairs)
    dc, pc = data_chunk or dc, particle_chunk or pc
    if pc < k and pc % PARTICLE_BLOCK:
        raise ConfigError(f"particle_chunk={pc} must be a multiple of {PARTICLE_BLOCK} (or >= k={k})")

    log_px = torch.empty(n, dtype=torch.float64)
    elbo = torch.empty(n, dtype=torch.float64)
    log_lik = torch.zeros(n, dtype=torch.float64)
    ess = torch.empty(n, dtype=torch.float64)
    khat = np.full(n, np.nan)
    kl_sum: dict[str, torch.Tensor] = {}
    kl_total: dict[str, torch.Tensor] = {}
    methods: dict[str, str] = {}
    bar = tqdm(total=n * k, desc=f"log p(x), k={k}", unit="pair", unit_scale=True,
               disable=None if progress else True, leave=False)
    for i in range(0, n, dc):
        xb = x[i:i + dc]
        b = len(xb)
        lw = torch.empty(k, b, device=x.device, dtype=x.dtype if x.is_floating_point() else None)
        for j in range(0, k, pc):
            kc = min(pc, k - j)
            c = _Chunk(model, guide, xb, kc, _noise(seed, range(i, i + b), j, kc, layout), closed_form, layout,
                       **context_rows(context, i, i + b))
            lw[j:j + kc] = c.log_w
            log_lik[i:i + b] += c.log_lik.double().sum(0).cpu()
            for name, s in c.sites.items():
                methods[name] = s["method"]
                kl_total[name] = kl_total.get(name, 0) + s["total"].double().sum().cpu()
                if s["per_dim"] is not None:
                    kl_sum[name] = kl_sum.get(name, 0) + s["per_dim"].cpu()
            bar.update(b * kc)
        lw64 = lw.double()
        log_px[i:i + b] = (torch.logsumexp(lw64, 0) - math.log(k)).cpu()
        elbo[i:i + b] = lw64.mean(0).cpu()
        ess[i:i + b] = torch.exp(2 * torch.logsumexp(lw64, 0) - torch.logsumexp(2 * lw64, 0)).cpu()
        if psis and k >= 5:
            khat[i:i + b] = psislw(lw64.T.cpu().numpy())[1]
    bar.close()

    ll, el, dist_ = float(log_px.mean()), float(elbo.mean()), -float(log_lik.mean()) / k
    kl_per_site = {s: float(v) / (n * k) for s, v in kl_total.items()}
    result = {
        "k": k,
        "num_points": n,
        "seed": seed,
        "test_log_likelihood": ll,
        "test_nll": -ll,
        **bits_per_dim(model, x, ll, getattr(model, "scored_dims", x.shape[1]), guide, **context),  # discrete data only
        "test_elbo": el,
        "elbo_gap": ll - el,
        "distortion": dist_,
        "rate": sum(kl_per_site.values()),
        "kl_per_site": kl_per_site,
        "kl_method": methods,
        "kl_per_dim": {s: (v / (n * k)).tolist() for s, v in kl_sum.items()},
        "ess_mean": float(ess.mean()),
        "ess_share_mean": float(ess.mean()) / k,
        "ess_min": float(ess.min()),
    }
    if psis and k >= 5:
        result.update(_khat_summary(khat))
    result.update(data_chunk=dc, particle_chunk=pc, bytes_per_pair=per_pair,
                  max_memory=None if max_memory is None else parse_bytes(max_memory),
                  eval_time_s=time.perf_counter() - t0)
    if return_points:
        result["points"] = {"log_px": log_px.numpy(), "elbo": elbo.numpy(), "ess": ess.numpy(),
                            "pareto_k": khat}
    return result


def _khat_summary(khat: np.ndarray) -> dict:
    counts, edges = np.histogram(np.clip(khat, -0.5, 1.5), bins=np.linspace(-0.5, 1.5, 41))
    return {
        "pareto_k_mean": float(np.mean(khat)),
        "pareto_k_median": float(np.median(khat)),
        "pareto_k_max": float(np.max(khat)),
        "share_khat_above_0.5": float(np.mean(khat > 0.5)),
        f"share_khat_above_{KHAT_BAD}": float(np.mean(khat > KHAT_BAD)),
        "pareto_k_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


def importance_log_weights_stats(model, guide, x, k: int = 1000, max_batch_particles: int = 100_000,
                                 progress: bool = False, **context):
    """Per data point: (log p(x) estimate with k particles, k-sample ELBO estimate), each (N,)."""
    r = evaluate(model, guide, x, k, max_batch_particles, progress, psis=False, return_points=True,
                 **context)
    return (torch.as_tensor(r["points"]["log_px"], dtype=torch.float32),
            torch.as_tensor(r["points"]["elbo"], dtype=torch.float32))


# ----------------------------------------------------------------------------------------------
# latent diagnostics


@torch.no_grad()
def posterior_means(guide, x, num_samples: int = 64, seed: int = 0, chunk: int = 1000, **context) -> dict:
    """E_q[z_s | x] per latent site s of the guide, each (N, dims).

    Uses the mean of each site's distribution, averaged over ``num_samples`` draws of the sites
    it depends on (exact for a single-site Gaussian guide, Monte Carlo for layered ones), or,
    where the distribution has no closed-form mean (a flow such as ``iaf``), the average of the
    ``num_samples`` draws themselves.
    """
    from pyro import poutine

    from pyro_vae.objectives.base import repeat_rows, vectorize

    out: dict[str, list] = {}
    repeated = False
    for i in range(0, len(x), chunk):
        xb, rows = x[i:i + chunk], context_rows(context, i, i + chunk)
        if not repeated:
            try:
                with BlockNoise(seed, range(i, i + len(xb))):
                    tr = poutine.trace(vectorize(guide, num_samples)).get_trace(xb, **rows)
            except (RuntimeError, ValueError, IndexError):  # a guide that does not broadcast
                repeated = True
        if repeated:  # the batch repeated once per draw (rows j * B + i), the same noise
            args, kwargs = repeat_rows((xb,), rows, num_samples)
            with BlockNoise(seed, range(i, i + len(xb)), repeats=num_samples):
                tr = poutine.trace(guide).get_trace(*args, **kwargs)
        for name, s in tr.nodes.items():
            if is_latent(s):
                try:
                    m = s["fn"].mean.expand(s["value"].shape)
                except NotImplementedError:  # no closed form (a flow): average the draws
                    m = s["value"]
                m = m.reshape(num_samples, len(xb), -1) if repeated else m
                out.setdefault(name, []).append(m.mean(0).reshape(len(xb), -1))
    return {name: torch.cat(v) for name, v in out.items()}


def active_units_per_site(guide, x, threshold: float = 0.01, **context) -> dict:
    """{site: (count, variances)}: see ``active_units``."""
    result = {}
    for name, mean in posterior_means(guide, x, **context).items():
        var = mean.double().var(0).float()
        result[name] = (int((var > threshold).sum()), var)
    return result


def active_units(guide, x, threshold: float = 0.01, **context) -> tuple[int, torch.Tensor]:
    """Burda et al. 2016 (sec. 5.2): unit u is active when A_u = Var_x(E_{q(z|x)}[z_u]) > threshold.

    Returns (number of active units, A as a 1-D tensor over every latent unit, the guide's sites
    concatenated in sampling order). The variance is the sample variance over the rows of x.
    """
    per_site = active_units_per_site(guide, x, threshold, **context)
    return sum(c for c, _ in per_site.values()), torch.cat([v for _, v in per_site.values()])


@torch.no_grad()
def mutual_information(guide, x, seed: int = 0, chunk: int = 256, **context) -> float:
    """I(x; z) under q(x, z) = p_data(x) q(z|x), by the estimator of He et al. 2019 (`calc_mi`),
    which is the mutual-information term of Hoffman & Johnson's ELBO surgery (2016):

        I = E_x E_{q(z|x)} [log q(z|x) - log q(z)],  q(z) ~= (1/N) sum_n q(z|x_n),

    with one draw z_i ~ q(z|x_i) per point and the aggregate posterior q(z) approximated by the
    mixture over all N given points (so I <= log N). Needs ``guide.posterior(x)``; for a layered
    guide q(z1|x) q(z2|z1) that is q(z1|x), and I(x; z1, z2) = I(x; z1).
    """
    if not hasattr(guide, "posterior"):
        raise ProgramError(f"{type(guide).__name__} has no posterior(x); mutual information needs one")
    q = guide.posterior(x, **context)
    base = q
    while isinstance(base, dist.Independent):
        base = base.base_dist
    g = torch.Generator(device=x.device).manual_seed(seed)
    n = x.shape[0]
    if isinstance(base, dist.Normal):
        loc, scale = (t.double().expand(n, -1) for t in (base.loc, base.scale))
        z = loc + scale * torch.randn(loc.shape, generator=g, device=x.device, dtype=loc.dtype)
        prec = scale**-2
        const = -(scale.log().sum(-1) + 0.5 * (loc**2 * prec).sum(-1) + 0.5 * loc.shape[-1] * math.log(2 * math.pi))

        def rows(zi):  # log q(z_i | x_j) = -0.5 z_i^2 . prec_j + z_i . (loc_j prec_j) + const_j
            return -0.5 * (zi**2) @ prec.T + zi @ (loc * prec).T + const
    elif isinstance(q, dist.TransformedDistribution):
        raise ProgramError(f"mutual information needs log q(z_i | x_j) for every pair of points; the flow of "
                         f"{type(guide).__name__} gives it only by inverting its transforms N^2 times, so it "
                         f"is not computed for this guide")
    else:
        z = q.sample()

        def rows(zi):
            return q.log_prob(zi[:, None]).double()
    total = 0.0
    for i in range(0, n, chunk):  # (chunk, N) at a time: never the whole N x N matrix
        log_q = rows(z[i:i + chunk])
        own = log_q[torch.arange(len(log_q)), torch.arange(i, i + len(log_q))]
        total += float((own - torch.logsumexp(log_q, 1)).sum())
    return total / n + math.log(n)


# ----------------------------------------------------------------------------------------------
# ArviZ export


@torch.no_grad()
def posterior_inference_data(model, guide, x, indices, num_draws: int = 1000, seed: int = 0, **context):
    """ArviZ InferenceData with draws z ~ q(z|x) for the points ``x[indices]`` and their log
    importance weights (the same draws the evaluation with this seed used).

    Groups: ``posterior`` (one variable per latent site, dims point x site_dim),
    ``sample_stats`` (``log_weight``), ``constant_data`` (``pareto_k`` and ``log_px`` per point).
    """
    indices = [int(i) for i in indices]
    xs = x[indices]
    layout = particle_layout_for(model, guide, x, context)
    c = _Chunk(model, guide, xs, num_draws, _noise(seed, indices, 0, num_draws, layout), False, layout,
               **{k: v[list(indices)] for k, v in context.items()})
    lw = c.log_w.double().cpu().numpy()  # (draws, points)
    posterior, dims, coords = {}, {}, {"point": indices}
    for name, s in c.sites.items():
        v = s["value"]
        if layout[0] == REPEATED:  # rows j * P + i
            v = v.reshape(num_draws, len(indices), -1)
        else:
            v = v.expand(num_draws, len(indices), *v.shape[2:]).reshape(num_draws, len(indices), -1)
        posterior[name] = v.cpu().numpy()[None]
        dims[name] = ["point", f"{name}_dim"]
    khat = psislw(lw.T)[1] if num_draws >= 5 else np.full(len(indices), np.nan)
    log_px = torch.logsumexp(torch.as_tensor(lw), 0).numpy() - math.log(num_draws)
    dims.update(log_weight=["point"], pareto_k=["point"], log_px=["point"])
    groups = {"posterior": posterior, "sample_stats": {"log_weight": lw[None]},
              "constant_data": {"pareto_k": khat, "log_px": log_px}}
    return _inference_data(groups, coords, dims)


# ----------------------------------------------------------------------------------------------
# a run directory


def evaluate_run(run_dir: str | Path, k: int = 1000, device: str = "auto", seed: int = 0,
                 test_size: int | None = None, max_batch_particles: int = 100_000,
                 progress: bool = False, *, max_memory=None, export_points=(0, 1, 2, 3),
                 export_draws: int = 1000, figures: bool = True, best: bool = False,
                 trust_code: bool = False) -> dict:
    """Evaluate a run's checkpoint on its test set; write ``RUN/eval.json`` (every figure),
    ``RUN/posterior.nc`` (ArviZ InferenceData for ``export_points``) and the figures
    ``RUN/figures/kl_per_dim.png`` and ``RUN/figures/pareto_k.png``. A run that names its programs
    by import path needs ``trust_code=True`` (see ``pyro_vae.run.load_run``)."""
    from pyro_vae.data import load_run_data
    from pyro_vae.distributed import resolve_device
    from pyro_vae.run import FIGURES, load_run

    run_dir = Path(run_dir)
    dev = resolve_device(device)
    config, model, guide = load_run(run_dir, dev, best=best, trust_code=trust_code)
    data = load_run_data(config, dev, test_size, run_dir=run_dir)
    x = data.test
    pyro.set_rng_seed(seed)
    if callable(getattr(guide, "encode_codes", None)):  # a VQ-VAE: its bound, with the learned prior where fitted
        return _evaluate_vq_run(run_dir, config, model, guide, x, dev, best)
    context = data.context(context_keys(model, guide), split="test")  # labels for conditional models
    result = evaluate(model, guide, x, k, max_batch_particles, progress, max_memory=max_memory,
                      seed=seed, return_points=True, **context)
    points = result.pop("points")
    if data.standardization is not None:  # densities of x_std -> of x: + log|dx_std/dx| = -sum_d log sd_d
        jac = data.standardization.log_jacobian
        for key in ("test_log_likelihood", "test_elbo"):
            result[key] += jac
        result["test_nll"], result["distortion"] = result["test_nll"] - jac, result["distortion"] - jac
        points["log_px"], points["elbo"] = points["log_px"] + jac, points["elbo"] + jac
        result["log_jacobian"] = jac
        result["units_note"] = ("log p(x), ELBO, NLL and distortion are in the data's own units: the model was "
                                "trained on standardized data, and log_jacobian = -sum_d log sd_d is added")
    au = active_units_per_site(guide, x, **context)
    result["active_units"] = sum(c for c, _ in au.values())
    result["active_units_per_site"] = {s: c for s, (c, _) in au.items()}
    result["active_unit_variances"] = {s: v.tolist() for s, (_, v) in au.items()}
    try:
        result["mutual_information"] = mutual_information(guide, x, seed, **context)
        result["mutual_information_bound"] = math.log(len(x))
    except ValueError as e:
        result["mutual_information"] = None
        result["mutual_information_note"] = str(e)
    result.update(run=str(run_dir), dataset=config.dataset, weights="best.pt" if best else "checkpoint.pt")

    save_npz(run_dir / "eval_points.npz", **points)
    outside = [i for i in export_points if not 0 <= i < len(x)]
    if outside:
        raise ConfigError(f"--export-points {' '.join(map(str, outside))}: not test points; the test set has "
                          f"{len(x)} (0..{len(x) - 1})")
    export = list(export_points)
    if export:
        idata = posterior_inference_data(model, guide, x, export, export_draws, seed, **context)
        atomic_write(run_dir / "posterior.nc", lambda p: idata.to_netcdf(str(p)))
        result["posterior_netcdf"] = str(run_dir / "posterior.nc")
    if figures:
        from pyro_vae.plots import save_khat_histogram, save_kl_per_dim

        if result["kl_per_dim"]:
            result["figure_kl_per_dim"] = str(save_kl_per_dim(result["kl_per_dim"], run_dir / FIGURES / "kl_per_dim.png"))
        if np.isfinite(points["pareto_k"]).any():
            result["figure_pareto_k"] = str(save_khat_histogram(points["pareto_k"], run_dir / FIGURES / "pareto_k.png"))
    write_json(run_dir / "eval.json", result)
    return result


def _evaluate_vq_run(run_dir: Path, config, model, guide, x, device, best: bool) -> dict:
    """``pyro_vae.vq.evaluate_vq`` on a VQ-VAE run's test set, with its ``pixelcnn`` prior where one
    is fitted to this checkpoint's codes, bits/dim for discrete data; written to ``RUN/eval.json``."""
    from pyro_vae.likelihoods import bits_per_dim
    from pyro_vae.second_stage import open_prior, prior_path
    from pyro_vae.vq import evaluate_vq

    model.eval(), guide.eval()
    prior = open_prior(run_dir, "pixelcnn", device, best)[0] if prior_path(run_dir, "pixelcnn").exists() else None
    result = evaluate_vq(model, guide, x, prior)
    for which in ("uniform", "pixelcnn"):
        if f"test_nll_bound_{which}" in result:
            bpd = bits_per_dim(model, x[:2], -result[f"test_nll_bound_{which}"], x.shape[1], guide)
            result[f"test_bits_per_dim_bound_{which}"] = bpd["test_bits_per_dim"]
    if prior is None:
        result["prior_note"] = f"no pixelcnn prior: fit one with `pyro-vae prior {run_dir} --kind pixelcnn`"
    result.update(run=str(run_dir), dataset=config.dataset, weights="best.pt" if best else "checkpoint.pt",
                  test_points=len(x))
    write_json(run_dir / "eval.json", result)
    return result
