"""ArviZ export: posterior draws and log importance weights of chosen points as InferenceData
(written to netCDF by ``evaluate_run``), for arviz 0.2x and 1.x."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from pyro_vae.evaluation.chunk import Chunk, particle_layout_for, seeded_noise
from pyro_vae.evaluation.psis import psislw
from pyro_vae.objectives.base import REPEATED


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
    c = Chunk(model, guide, xs, num_draws, seeded_noise(seed, indices, 0, num_draws, layout), False, layout,
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


def _inference_data(groups: dict, coords: dict, dims: dict):
    """``arviz.from_dict`` for arviz 0.2x (keyword groups) and 1.x (a dict of groups)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az
    if int(az.__version__.split(".")[0]) >= 1:
        return az.from_dict(groups, coords=coords, dims=dims)
    return az.from_dict(**groups, coords=coords, dims=dims)

