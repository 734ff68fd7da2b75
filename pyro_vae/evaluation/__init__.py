"""Honest evaluation of a trained model: importance-sampled log-likelihood, the ELBO split into
distortion and rate, latent diagnostics, and PSIS diagnostics of the guide through ArviZ.

One module per job:

- ``likelihood``: ``evaluate`` (log p(x) with k importance samples, the ELBO, distortion and
  rate, k-hat and ESS from one pass) and its ``EvalOptions``;
- ``chunk``: the log weights and KL terms of one chunk of data points x particles;
- ``noise``: ``BlockNoise``, draws seeded per (point, particle block), so results do not depend
  on the chunking;
- ``memory``: memory bounds, the measured peak of a probe chunk, chunk planning;
- ``psis``: Pareto-smoothed importance sampling through arviz 0.2x or 1.x;
- ``diagnostics``: posterior means, active units, mutual information;
- ``export``: ArviZ InferenceData of chosen points;
- ``run``: ``evaluate_run``, a run directory's checkpoint on its test set, written to files.
"""

from pyro_vae.evaluation.chunk import Chunk, particle_layout_for
from pyro_vae.evaluation.diagnostics import (
    active_units,
    active_units_per_site,
    mutual_information,
    posterior_means,
)
from pyro_vae.evaluation.export import posterior_inference_data
from pyro_vae.evaluation.likelihood import EvalOptions, bytes_per_pair, evaluate, evaluate_with
from pyro_vae.evaluation.memory import parse_bytes, peak_memory_bytes, plan_chunks
from pyro_vae.evaluation.noise import PARTICLE_BLOCK, BlockNoise
from pyro_vae.evaluation.psis import KHAT_BAD, psislw
from pyro_vae.evaluation.run import evaluate_run

__all__ = [
    "PARTICLE_BLOCK", "KHAT_BAD", "BlockNoise", "Chunk", "EvalOptions", "active_units", "active_units_per_site",
    "bytes_per_pair", "evaluate", "evaluate_run", "evaluate_with", "mutual_information", "parse_bytes",
    "particle_layout_for", "peak_memory_bytes", "plan_chunks", "posterior_inference_data", "posterior_means",
    "psislw",
]
