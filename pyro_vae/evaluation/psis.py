"""Pareto-smoothed importance sampling through ArviZ (0.2x: ``arviz.psislw``; 1.x: ``arviz_stats``),
and the k-hat summary of an evaluation (Vehtari et al. 2024)."""

from __future__ import annotations

import warnings

import numpy as np

KHAT_BAD = 0.7  # Vehtari et al. 2024: above this the importance-sampling estimate is unreliable

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



def khat_summary(khat: np.ndarray) -> dict:
    """Mean, median, max, shares above 0.5 and ``KHAT_BAD``, and a histogram of per-point k-hats."""
    counts, edges = np.histogram(np.clip(khat, -0.5, 1.5), bins=np.linspace(-0.5, 1.5, 41))
    return {
        "pareto_k_mean": float(np.mean(khat)),
        "pareto_k_median": float(np.median(khat)),
        "pareto_k_max": float(np.max(khat)),
        "share_khat_above_0.5": float(np.mean(khat > 0.5)),
        f"share_khat_above_{KHAT_BAD}": float(np.mean(khat > KHAT_BAD)),
        "pareto_k_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }
