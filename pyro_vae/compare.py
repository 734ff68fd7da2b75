"""Estimator comparison: train one model/guide pair per estimator and tabulate, and gradient
signal-to-noise (Rainforth et al. 2018, "Tighter variational bounds are not necessarily better").

``compare(config, estimators, out)`` is the Python side of ``pyro-vae compare``; a user's own
model and guide enter through ``config.model``/``config.guide`` as ``package.module:Class``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import resource
import sys
import time
from pathlib import Path

import pyro
import torch

from pyro_vae.config import TrainConfig
from pyro_vae.errors import ConfigError
from pyro_vae.files import atomic_write
from pyro_vae.objectives import make_estimator
from pyro_vae.objectives.base import site_log_prob, traces
from pyro_vae.objectives.kl import site_kl, site_kls


def _as_estimator(estimator, particles=None):
    return make_estimator(estimator, particles) if isinstance(estimator, str) else estimator


def gradient_snr(model, guide, estimator, x, repeats: int = 100, particles: int | None = None,
                 **context) -> dict:
    """Gradient signal-to-noise ratio per parameter, |mean| / std over ``repeats`` draws of the
    estimator's gradient (of the loss per data point) at fixed parameters and batch ``x``.

    Returns ``model_snr`` and ``guide_snr`` (the mean over scalar parameters), their medians
    (``*_snr_median``), and the per-parameter values (``model_per_parameter``, ``guide_per_parameter``).
    Parameters whose gradient is identically zero are left out.
    """
    est = _as_estimator(estimator, particles)
    groups = {"model": [p for p in model.parameters() if p.requires_grad],
              "guide": [p for p in guide.parameters() if p.requires_grad]}
    params = groups["model"] + groups["guide"]
    draws = []
    for _ in range(repeats):
        loss = est.differentiable_loss(model, guide, x, **context) / x.shape[0]
        g = torch.autograd.grad(loss, params, allow_unused=True)
        draws.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).detach().flatten()
                                for gi, p in zip(g, params)]))
    draws = torch.stack(draws).double()
    n_model = sum(p.numel() for p in groups["model"])
    result = {"repeats": repeats}
    for name, g in (("model", draws[:, :n_model]), ("guide", draws[:, n_model:])):
        std = g.std(0)
        snr = (g.mean(0).abs() / std)[std > 0]
        result[f"{name}_snr"] = float(snr.mean()) if len(snr) else float("nan")
        result[f"{name}_snr_median"] = float(snr.median()) if len(snr) else float("nan")
        result[f"{name}_per_parameter"] = snr.float()
    return result


def snr_against_k(model, guide, x, estimators=("iwae", "dreg"), ks=(1, 5, 50), repeats: int = 100,
                  seed: int = 0) -> list[dict]:
    """Rows ``{estimator, K, model_snr, guide_snr}`` for each estimator family and K."""
    rows = []
    for name in estimators:
        for k in ks:
            pyro.set_rng_seed(seed)
            r = gradient_snr(model, guide, f"{name}:K={k}", x, repeats)
            rows.append({"estimator": name, "K": k, "model_snr": r["model_snr"], "guide_snr": r["guide_snr"]})
    return rows


@torch.no_grad()
@torch.no_grad()
def kl_by_site(model, guide, x, particles: int = 10, **context) -> dict[str, tuple[float, str]]:
    """Per latent site, (KL(q(z|x) || p(z)) per data point in nats, method): in closed form where
    ``objectives.kl`` finds it valid, else E_q[log q - log p] from ``particles`` draws."""
    model_trace, guide_trace = traces(model, guide, x, particles, **context)
    per_point = particles * x.shape[0]
    out = {}
    for name, (method, kl) in site_kls(model_trace, guide_trace).items():
        q_site, p_site = guide_trace.nodes[name], model_trace.nodes.get(name)
        if kl is not None:
            total = site_kl(p_site, q_site, kl).sum()
        else:
            total = site_log_prob(q_site).sum() - (site_log_prob(p_site).sum() if p_site else 0.0)
        out[name] = (float(total) / per_point, method)
    return out


def kl_estimate(model, guide, x, particles: int = 10, **context) -> float:
    """KL(q(z|x) || p(z)) per data point, summed over latent sites, averaged over x (closed form
    per site where valid, Monte Carlo otherwise: ``kl_by_site`` says which)."""
    return sum(kl for kl, _ in kl_by_site(model, guide, x, particles, **context).values())


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA peak allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "process peak RSS (cumulative)"


COLUMNS = ["estimator", "train_bound", "test_bound", "test_log_likelihood", "kl", "active_units",
           "seconds_per_epoch", "peak_memory_mb", "model_snr", "guide_snr"]


def compare(config: TrainConfig | dict, estimators, out, k: int = 1000, snr_repeats: int = 100,
            snr_ks=(1, 5, 50), snr_batch: int = 100, dataset=None, quiet: bool = True,
            overwrite: bool = False) -> list[dict]:
    """Train ``config`` once per estimator spec (same seed, architecture, initial weights) and
    write ``out/compare.csv``, ``out/compare.md``, ``out/figures/compare_bounds.png`` and
    ``out/figures/compare_snr.png``; each run lands in ``out/runs/SPEC``. Returns the rows.

    Per estimator: final train and test bound (its own bound, nats per data point), test
    log-likelihood (importance sampling with ``k`` samples), KL(q || p), active units, seconds
    per epoch, peak memory, and the gradient SNR of its own estimator on the first ``snr_batch``
    training points at the trained parameters. The SNR-against-K figure uses the first
    estimator's trained model, for ``iwae`` and ``dreg`` at each K in ``snr_ks``. Runs already
    in ``out/runs`` are replaced only with ``overwrite``.
    """
    from pyro_vae.data import load_dataset
    from pyro_vae.distributed import resolve_device
    from pyro_vae.plots import save_bound_curves, save_snr_against_k

    base = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    if not estimators:
        raise ConfigError("compare needs at least one estimator, e.g. ['elbo', 'iwae:K=5']")
    for spec in estimators:  # fail before any training on a bad name
        make_estimator(spec, base.particles)
    out = Path(out)
    device = resolve_device(base.device)
    if dataset is None:
        dataset = load_dataset(base.dataset, device, base.data_dir, base.validation, base.train_size,
                               base.test_size, base.image_size, base.classes)
    rows, curves, first = [], {}, None
    for spec in estimators:
        cfg = TrainConfig.from_dict({**dataclasses.asdict(base), "estimator": spec})
        row, metrics, trained = _train_and_measure(cfg, dataset, out / "runs" / _slug(spec), device, k,
                                                   snr_batch, snr_repeats, quiet, overwrite)
        rows.append(row)
        curves[spec] = [(m["epoch"], -m["test_loss"]) for m in metrics]
        first = first or trained

    snr_rows = snr_against_k(*first, ks=snr_ks, repeats=snr_repeats, seed=base.seed)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "compare.csv", rows)
    _write_markdown(out / "compare.md", rows, snr_rows, base, k, _peak_memory_mb(device)[1], estimators[0])
    save_bound_curves(curves, out / "figures" / "compare_bounds.png")
    save_snr_against_k(snr_rows, out / "figures" / "compare_snr.png",
                       title=f"gradient SNR at the trained {estimators[0]} model")
    return rows


def _train_and_measure(cfg: TrainConfig, dataset, run_dir: Path, device, k: int, snr_batch: int,
                       snr_repeats: int, quiet: bool, overwrite: bool):
    """Train one estimator's run and measure it: (its row of compare.csv, its metrics, and
    (model, guide, SNR batch) for the SNR-against-K figure)."""
    from pyro_vae.evaluation import active_units, evaluate
    from pyro_vae.run import load_run
    from pyro_vae.training import train

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    metrics = train(cfg, run_dir, quiet=quiet, dataset=dataset, overwrite=overwrite)
    memory, _ = _peak_memory_mb(device)
    _, model, guide = load_run(run_dir, device, trust_code=True)  # the caller's own config, just trained
    pyro.set_rng_seed(cfg.seed)
    ev = evaluate(model, guide, dataset.test, k)
    pyro.set_rng_seed(cfg.seed)
    x_snr = dataset.train[:snr_batch]
    x_snr = torch.bernoulli(x_snr) if dataset.binarize else x_snr
    snr = gradient_snr(model, guide, make_estimator(cfg.estimator, cfg.particles), x_snr, snr_repeats)
    row = {
        "estimator": cfg.estimator,
        "train_bound": -metrics[-1]["train_loss"],
        "test_bound": -metrics[-1]["test_loss"],
        "test_log_likelihood": ev["test_log_likelihood"],
        "kl": kl_estimate(model, guide, dataset.test[:1000]),
        "active_units": active_units(guide, dataset.test)[0],
        "seconds_per_epoch": sum(m["epoch_time_s"] for m in metrics) / len(metrics),
        "peak_memory_mb": memory,
        "model_snr": snr["model_snr"],
        "guide_snr": snr["guide_snr"],
    }
    if not quiet:
        print(f"{cfg.estimator}: test log p(x) {row['test_log_likelihood']:.2f}, "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return row, metrics, (model, guide, x_snr)


def _write_csv(path: Path, rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def _write_markdown(path: Path, rows, snr_rows, config: TrainConfig, k: int, memory_kind: str,
                    snr_model: str) -> None:
    head = ["estimator", "train bound", "test bound", f"test log p(x) (k={k})", "KL", "active units",
            "s / epoch", "peak memory (MB)", "model SNR", "guide SNR"]
    lines = [
        "# Estimator comparison",
        "",
        f"{config.model} / {config.guide} (preset {config.preset}), {config.dataset}, {config.epochs} epochs, "
        f"batch {config.batch_size}, Adam lr {config.lr}, seed {config.seed}. Bounds and log p(x) in nats "
        f"per data point (higher is better); each bound is the estimator's own. Memory: {memory_kind}. "
        f"SNR: mean over parameters of |mean| / std of the gradient at the trained parameters.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += ["", f"## Gradient SNR against K (at the trained {snr_model} model)", "",
              "| estimator | K | model SNR | guide SNR |", "|---|---|---|---|"]
    lines += [f"| {r['estimator']} | {r['K']} | {_fmt(r['model_snr'])} | {_fmt(r['guide_snr'])} |"
              for r in snr_rows]
    lines += ["", "Figures: `figures/compare_bounds.png`, `figures/compare_snr.png`.", ""]
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines)))
