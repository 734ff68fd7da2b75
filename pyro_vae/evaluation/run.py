"""Evaluate a run directory: its checkpoint on its test set, written to ``RUN/eval.json``,
``RUN/eval_points.npz``, ``RUN/posterior.nc`` and ``RUN/figures/``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyro

from pyro_vae.errors import ConfigError
from pyro_vae.evaluation.diagnostics import active_units_per_site, mutual_information
from pyro_vae.evaluation.export import posterior_inference_data
from pyro_vae.evaluation.likelihood import EvalOptions, evaluate_with
from pyro_vae.files import atomic_write, save_npz, write_json
from pyro_vae.programs import context_keys


def evaluate_run(run_dir: str | Path, k: int = 1000, *, device: str = "auto", test_size: int | None = None,
                 best: bool = False, trust_code: bool = False, export_points=(0, 1, 2, 3),
                 export_draws: int = 1000, figures: bool = True, **options) -> dict:
    """Evaluate a run's checkpoint (``best.pt`` with ``best``) on its test set (its first
    ``test_size`` rows); write ``RUN/eval.json`` (every figure of ``evaluate`` plus the latent
    diagnostics), ``RUN/eval_points.npz`` (per-point vectors), ``RUN/posterior.nc`` (ArviZ
    InferenceData for the test points ``export_points``, ``export_draws`` draws each) and, with
    ``figures``, ``RUN/figures/kl_per_dim.png`` and ``RUN/figures/pareto_k.png``.

    ``options`` are ``EvalOptions``' other fields (``seed``, ``max_memory``, ``progress``, ...).
    A run that names its programs by import path needs ``trust_code=True`` (see
    ``pyro_vae.run.load_run``)."""
    from pyro_vae.data import load_run_data
    from pyro_vae.distributed import resolve_device
    from pyro_vae.run import load_run

    options = EvalOptions(k=k, **{**options, "return_points": True})
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    config, model, guide = load_run(run_dir, dev, best=best, trust_code=trust_code)
    data = load_run_data(config, dev, test_size, run_dir=run_dir)
    x = data.test
    pyro.set_rng_seed(options.seed)
    if callable(getattr(guide, "encode_codes", None)):  # a VQ-VAE: its bound, with the learned prior where fitted
        return _evaluate_vq_run(run_dir, config, model, guide, x, dev, best)
    context = data.context(context_keys(model, guide), split="test")  # labels for conditional models
    outside = [i for i in export_points if not 0 <= i < len(x)]
    if outside:
        raise ConfigError(f"--export-points {' '.join(map(str, outside))}: not test points; the test set has "
                          f"{len(x)} (0..{len(x) - 1})")
    result = evaluate_with(model, guide, x, options, context)
    points = result.pop("points")
    if data.standardization is not None:
        _to_data_units(result, points, data.standardization.log_jacobian)
    result.update(_latent_diagnostics(guide, x, options.seed, context))
    result.update(run=str(run_dir), dataset=config.dataset, weights="best.pt" if best else "checkpoint.pt")

    save_npz(run_dir / "eval_points.npz", **points)
    if export_points:
        idata = posterior_inference_data(model, guide, x, list(export_points), export_draws, options.seed, **context)
        atomic_write(run_dir / "posterior.nc", lambda p: idata.to_netcdf(str(p)))
        result["posterior_netcdf"] = str(run_dir / "posterior.nc")
    if figures:
        result.update(_figures(run_dir, result, points))
    write_json(run_dir / "eval.json", result)
    return result


def _to_data_units(result: dict, points: dict, jac: float) -> None:
    """Densities of standardized x -> of x: + log|dx_std/dx| = -sum_d log sd_d (in place)."""
    for key in ("test_log_likelihood", "test_elbo"):
        result[key] += jac
    result["test_nll"], result["distortion"] = result["test_nll"] - jac, result["distortion"] - jac
    points["log_px"], points["elbo"] = points["log_px"] + jac, points["elbo"] + jac
    result["log_jacobian"] = jac
    result["units_note"] = ("log p(x), ELBO, NLL and distortion are in the data's own units: the model was "
                            "trained on standardized data, and log_jacobian = -sum_d log sd_d is added")


def _latent_diagnostics(guide, x, seed: int, context: dict) -> dict:
    """Active units per site and in all, and the mutual information I(x; z) where the guide gives it."""
    au = active_units_per_site(guide, x, **context)
    out = {"active_units": sum(c for c, _ in au.values()),
           "active_units_per_site": {s: c for s, (c, _) in au.items()},
           "active_unit_variances": {s: v.tolist() for s, (_, v) in au.items()}}
    try:
        out["mutual_information"] = mutual_information(guide, x, seed, **context)
        out["mutual_information_bound"] = math.log(len(x))
    except ValueError as e:
        out["mutual_information"] = None
        out["mutual_information_note"] = str(e)
    return out


def _figures(run_dir: Path, result: dict, points: dict) -> dict:
    """The KL-per-dimension bars and the k-hat histogram, as {result key: path}."""
    from pyro_vae.plots import save_khat_histogram, save_kl_per_dim
    from pyro_vae.run import FIGURES

    out = {}
    if result["kl_per_dim"]:
        out["figure_kl_per_dim"] = str(save_kl_per_dim(result["kl_per_dim"], run_dir / FIGURES / "kl_per_dim.png"))
    if np.isfinite(points["pareto_k"]).any():
        out["figure_pareto_k"] = str(save_khat_histogram(points["pareto_k"], run_dir / FIGURES / "pareto_k.png"))
    return out

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
