"""The importance-sampled log-likelihood and the ELBO split, in chunks of data points x particles.

log p(x) ~= log (1/k) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016, eq. 9):
a lower bound in expectation that tightens as k grows, with the guide as proposal. The same
weights give the k-sample ELBO estimate mean_k log w_k, its split -ELBO = distortion + rate
(Alemi et al. 2018), the Pareto k-hat of each point's weights and their effective sample size,
all from one pass. Per-point figures come from each point's full vector of k log weights, never
from partial sums.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from pyro_vae.checks import check_data_support, check_finite
from pyro_vae.errors import ConfigError
from pyro_vae.evaluation.chunk import Chunk, context_rows, particle_layout_for, seeded_noise
from pyro_vae.evaluation.memory import CPU_CHUNK_PAIRS, parse_bytes, peak_memory_bytes, plan_chunks
from pyro_vae.evaluation.noise import PARTICLE_BLOCK
from pyro_vae.evaluation.psis import khat_summary, psislw
from pyro_vae.likelihoods import bits_per_dim


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """How an evaluation runs; none of these changes a figure except ``k`` and ``seed``.

    - ``k``: importance samples per data point; ``seed``: the seed of the block noise.
    - ``psis``: compute each point's Pareto k-hat (needs k >= 5).
    - ``max_memory`` (bytes, or '1GB'): bound the working memory from a measured probe chunk;
      otherwise at most ``max_batch_particles`` (point, particle) pairs are in flight, and on a
      CPU at most ``CPU_CHUNK_PAIRS`` (cache-sized chunks are faster there).
    - ``data_chunk`` / ``particle_chunk`` force the chunk shape (tests).
    - ``progress``: a progress bar; ``return_points``: per-point vectors in ``result["points"]``.
    """

    k: int = 1000
    seed: int = 0
    psis: bool = True
    max_batch_particles: int = 100_000
    max_memory: int | float | str | None = None
    data_chunk: int | None = None
    particle_chunk: int | None = None
    progress: bool = False
    return_points: bool = False

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"k = {self.k}: the importance samples per point must be at least 1")
        if self.max_memory is not None:
            parse_bytes(self.max_memory)  # a readable, positive size, or a one-line error now


@torch.no_grad()
def evaluate(model, guide, x, k: int = 1000, *, max_batch_particles: int = 100_000, progress: bool = False,
             max_memory=None, seed: int = 0, psis: bool = True, data_chunk: int | None = None,
             particle_chunk: int | None = None, return_points: bool = False, **context) -> dict:
    """Every figure of the evaluation of ``model``/``guide`` on the rows of ``x``, as a dict.

    - ``test_log_likelihood`` (nats, mean over points of log (1/k) sum_k w_k), ``test_nll``,
      ``test_bits_per_dim`` (= nll / (D ln 2), D the dimensions the model scores: ``model.scored_dims``
      where it sets one, such as the hidden pixels of ``cvae-quadrant``, else all); ``test_elbo`` (mean log w) and the ELBO split:
      ``distortion`` = -E_q log p(x|z), ``rate`` = KL(q(z|x) || p(z)) per site and per latent
      dimension (closed form per site where ``objectives.kl`` finds it valid; Monte Carlo with
      the same particles otherwise; ``kl_method`` says which, with the reason).
    - ``pareto_k`` summary (PSIS, r_eff = 1 for independent draws) and ``share_khat_above_0.7``;
      ``ess`` of the raw weights (sum w)^2 / sum w^2 (Kish), mean and as a share of k.

    The keywords are ``EvalOptions``' fields; ``context`` holds the programs' other arguments
    (e.g. labels ``y``), one row per data point. Results do not depend on the chunking: draws
    are seeded per (point, particle block) by ``BlockNoise``.
    """
    options = EvalOptions(k=k, seed=seed, psis=psis, max_batch_particles=max_batch_particles,
                          max_memory=max_memory, data_chunk=data_chunk, particle_chunk=particle_chunk,
                          progress=progress, return_points=return_points)
    return evaluate_with(model, guide, x, options, context)


@torch.no_grad()
def evaluate_with(model, guide, x, options: EvalOptions, context: dict | None = None) -> dict:
    """``evaluate`` with its options as one ``EvalOptions``."""
    context = context or {}
    check_finite(x, "the data to evaluate")
    check_data_support(model, x, "the data to evaluate", guide=guide, **context)  # once, before any chunk
    with pyro.validation_enabled(False):  # Pyro's argument checks cost time per chunk
        return _evaluate(model, guide, x, options, context)


def _chunk_shape(model, guide, x, options: EvalOptions, context: dict, layout) -> tuple[int, int, float | None]:
    """(data points, particles) per chunk, and the measured bytes per pair when memory is bounded."""
    k = options.k
    if options.max_memory is not None:
        per_pair = bytes_per_pair(model, guide, x, k, options.seed, layout=layout, **context)
        pairs = max(1, int(parse_bytes(options.max_memory) / per_pair))
    else:
        per_pair, pairs = None, options.max_batch_particles
    if x.device.type == "cpu":
        pairs = min(pairs, CPU_CHUNK_PAIRS)
    dc, pc = plan_chunks(k, len(x), pairs)
    dc, pc = options.data_chunk or dc, options.particle_chunk or pc
    if pc < k and pc % PARTICLE_BLOCK:
        raise ConfigError(f"particle_chunk={pc} must be a multiple of {PARTICLE_BLOCK} (or >= k={k})")
    return dc, pc, per_pair


def _evaluate(model, guide, x, options: EvalOptions, context: dict) -> dict:
    t0 = time.perf_counter()
    n, k, seed = len(x), options.k, options.seed
    layout = particle_layout_for(model, guide, x, context)
    dc, pc, per_pair = _chunk_shape(model, guide, x, options, context, layout)
    totals = _Totals(n, psis=options.psis and k >= 5)
    bar = tqdm(total=n * k, desc=f"log p(x), k={k}", unit="pair", unit_scale=True,
               disable=None if options.progress else True, leave=False)
    for i in range(0, n, dc):
        xb = x[i:i + dc]
        b = len(xb)
        lw = torch.empty(k, b, device=x.device, dtype=x.dtype if x.is_floating_point() else None)
        for j in range(0, k, pc):
            kc = min(pc, k - j)
            c = Chunk(model, guide, xb, kc, seeded_noise(seed, range(i, i + b), j, kc, layout), True, layout,
                      **context_rows(context, i, i + b))  # closed-form KL per site where valid (objectives/kl.py)
            lw[j:j + kc] = c.log_w
            totals.add_chunk(c, slice(i, i + b))
            bar.update(b * kc)
        totals.add_points(lw, slice(i, i + b))
    bar.close()
    result = totals.summary(k)
    result.update(seed=seed, **bits_per_dim(model, x, result["test_log_likelihood"],
                                            getattr(model, "scored_dims", x.shape[1]), guide, **context))
    result.update(data_chunk=dc, particle_chunk=pc, bytes_per_pair=per_pair,
                  max_memory=None if options.max_memory is None else parse_bytes(options.max_memory),
                  eval_time_s=time.perf_counter() - t0)
    if options.return_points:
        result["points"] = totals.points()
    return result


class _Totals:
    """What the chunks of one evaluation add up to: per point, log p(x), the k-sample ELBO, the
    summed log-likelihood, ESS and k-hat, each from the point's full vector of k log weights; per
    latent site, the KL summed over points and particles (and per dimension where factorized)."""

    def __init__(self, n: int, psis: bool):
        self.n, self.psis = n, psis
        self.log_px, self.elbo, self.ess = (torch.empty(n, dtype=torch.float64) for _ in range(3))
        self.log_lik = torch.zeros(n, dtype=torch.float64)
        self.khat = np.full(n, np.nan)
        self.kl_total: dict[str, torch.Tensor] = {}
        self.kl_per_dim: dict[str, torch.Tensor] = {}
        self.methods: dict[str, str] = {}

    def add_chunk(self, c: Chunk, rows: slice) -> None:
        self.log_lik[rows] += c.log_lik.double().sum(0).cpu()
        for name, s in c.sites.items():
            self.methods[name] = s["method"]
            self.kl_total[name] = self.kl_total.get(name, 0) + s["total"].double().sum().cpu()
            if s["per_dim"] is not None:
                self.kl_per_dim[name] = self.kl_per_dim.get(name, 0) + s["per_dim"].cpu()

    def add_points(self, log_w: torch.Tensor, rows: slice) -> None:
        """The (k, points) log weights of whole points."""
        lw, k = log_w.double(), log_w.shape[0]
        self.log_px[rows] = (torch.logsumexp(lw, 0) - math.log(k)).cpu()
        self.elbo[rows] = lw.mean(0).cpu()
        self.ess[rows] = torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)).cpu()
        if self.psis:
            self.khat[rows] = psislw(lw.T.cpu().numpy())[1]

    def summary(self, k: int) -> dict:
        n = self.n
        ll, el = float(self.log_px.mean()), float(self.elbo.mean())
        kl_per_site = {s: float(v) / (n * k) for s, v in self.kl_total.items()}
        result = {
            "k": k,
            "num_points": n,
            "test_log_likelihood": ll,
            "test_nll": -ll,
            "test_elbo": el,
            "elbo_gap": ll - el,
            "distortion": -float(self.log_lik.mean()) / k,
            "rate": sum(kl_per_site.values()),
            "kl_per_site": kl_per_site,
            "kl_method": self.methods,
            "kl_per_dim": {s: (v / (n * k)).tolist() for s, v in self.kl_per_dim.items()},
            "ess_mean": float(self.ess.mean()),
            "ess_share_mean": float(self.ess.mean()) / k,
            "ess_min": float(self.ess.min()),
        }
        if self.psis:
            result.update(khat_summary(self.khat))
        return result

    def points(self) -> dict:
        return {"log_px": self.log_px.numpy(), "elbo": self.elbo.numpy(), "ess": self.ess.numpy(),
                "pareto_k": self.khat}


def bytes_per_pair(model, guide, x, k: int, seed: int = 0, layout=None, **context) -> float:
    """Measured peak bytes per (data point, particle) pair of one probe chunk, plus what the
    evaluation keeps per pair (log weights, PSIS's float64 copies)."""
    b, p = min(len(x), 4), min(k, PARTICLE_BLOCK)
    layout = layout or particle_layout_for(model, guide, x, context)
    noise = seeded_noise(seed, range(b), 0, p, layout)
    _, peak = peak_memory_bytes(lambda: Chunk(model, guide, x[:b], p, noise, False, layout,
                                              **context_rows(context, 0, b)), x.device)
    return peak / (b * p) + 4 + 6 * 8

