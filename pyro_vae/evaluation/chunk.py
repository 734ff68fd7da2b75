"""One chunk of data points x particles: log importance weights and the ELBO's parts, each
site's log-density computed once."""

from __future__ import annotations

import pyro.distributions as dist
import torch

from pyro_vae.errors import ProgramError
from pyro_vae.evaluation.noise import BlockNoise
from pyro_vae.objectives.base import (
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
from pyro_vae.sites import is_latent, observed_sites


def context_rows(context: dict, start: int, stop: int) -> dict:
    """The context tensors (e.g. labels y) of data rows start:stop."""
    return {k: v[start:stop] for k, v in context.items()}


def seeded_noise(seed, data_index, particle_offset, num_particles, layout) -> BlockNoise:
    """The chunk's seeded noise for the particle layout (the same draws in either layout)."""
    return BlockNoise(seed, data_index, particle_offset, num_particles if layout[0] == REPEATED else 0)


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


class Chunk:
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

