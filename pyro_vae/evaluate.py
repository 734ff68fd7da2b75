"""Honest evaluation of a trained model: importance-sampled log-likelihood and the test ELBO.

log p(x) ~= log (1/k) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016, eq. 9):
a lower bound in expectation that tightens as k grows; with the guide as proposal. The same
weights give the k-sample ELBO estimate mean_k log w_k, so both come from one pass.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pyro_vae.objectives.base import log_weights

LN2 = math.log(2.0)


@torch.no_grad()
def importance_log_weights_stats(model, guide, x, k: int = 1000, max_batch_particles: int = 100_000,
                                 progress: bool = False, **context):
    """Per data point: (log p(x) estimate with k particles, k-sample ELBO estimate), each (N,).

    Work is chunked so that at most ``max_batch_particles`` (data points x particles) are in
    flight at once: data points in chunks, and each point's k particles in chunks, combined
    with a running logsumexp.
    """
    particle_chunk = max(1, min(k, max_batch_particles))
    data_chunk = max(1, max_batch_particles // particle_chunk)
    log_px, elbo = [], []
    starts = range(0, len(x), data_chunk)
    for i in tqdm(starts, desc=f"log p(x), k={k}", disable=None if progress else True, leave=False):
        xb = x[i : i + data_chunk]
        lse, total = [], torch.zeros(len(xb), device=x.device)
        for j in range(0, k, particle_chunk):
            cb = {key: v[i : i + data_chunk] for key, v in context.items()}
            lw = log_weights(model, guide, xb, min(particle_chunk, k - j), **cb)
            lse.append(torch.logsumexp(lw, 0))
            total += lw.sum(0)
        log_px.append(torch.logsumexp(torch.stack(lse), 0) - math.log(k))
        elbo.append(total / k)
    return torch.cat(log_px), torch.cat(elbo)


def evaluate(model, guide, x, k: int = 1000, max_batch_particles: int = 100_000,
             progress: bool = False, **context) -> dict:
    """Mean test ELBO and importance-sampled log-likelihood (nats, and bits per dimension)."""
    t0 = time.perf_counter()
    log_px, elbo = importance_log_weights_stats(model, guide, x, k, max_batch_particles, progress, **context)
    ll, el = float(log_px.mean()), float(elbo.mean())
    return {
        "k": k,
        "num_points": len(x),
        "test_elbo": el,
        "test_log_likelihood": ll,
        "test_nll": -ll,
        "test_bits_per_dim": -ll / (x.shape[1] * LN2),
        "elbo_gap": ll - el,
        "eval_time_s": time.perf_counter() - t0,
    }


def evaluate_run(run_dir: str | Path, k: int = 1000, device: str = "auto", seed: int = 0,
                 test_size: int | None = None, max_batch_particles: int = 100_000,
                 progress: bool = False) -> dict:
    """Evaluate a run's checkpoint on its test set and write ``RUN/eval.json``."""
    import pyro

    from pyro_vae.data import load_dataset
    from pyro_vae.run import atomic_write, load_run
    from pyro_vae.train import resolve_device

    dev = resolve_device(device)
    config, model, guide = load_run(run_dir, dev)
    data = load_dataset(config.dataset, dev, config.data_dir, test_size=test_size or config.test_size,
                        train_size=1, image_size=config.image_size)
    pyro.set_rng_seed(seed)
    context = data.context(getattr(model, "context_keys", ()), split="test")  # labels for conditional models
    result = evaluate(model, guide, data.test, k, max_batch_particles, progress, **context)
    result.update(run=str(run_dir), dataset=config.dataset, seed=seed)
    text = json.dumps(result, indent=2)
    atomic_write(Path(run_dir) / "eval.json", lambda p: p.write_text(text))
    return result


@torch.no_grad()
def active_units(guide, x, threshold: float = 0.01, batch_size: int = 1000, particles: int = 100,
                 **context) -> int:
    """Number of active latent units (Burda et al. 2016, sec. 5.2): A_u = Cov_x(E_q(z|x)[z_u]) > 0.01.

    E_q[z_u] is ``guide.posterior(x).mean`` where the guide offers it, else the mean of
    ``particles`` vectorized samples of every latent site (flattened per data point).
    """
    from pyro import poutine

    from pyro_vae.objectives.base import vectorize

    means = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        if hasattr(guide, "posterior"):
            means.append(guide.posterior(xb, **context).mean.reshape(len(xb), -1))
            continue
        trace = poutine.trace(vectorize(guide, particles)).get_trace(xb, **context)
        sites = [s["value"] for s in trace.nodes.values()
                 if s["type"] == "sample" and not s["is_observed"] and s["value"].dim() >= 2
                 and s["value"].shape[1] == len(xb)]
        means.append(torch.cat([v.float().mean(0).reshape(len(xb), -1) for v in sites], -1))
    return int((torch.cat(means).var(0) > threshold).sum())
