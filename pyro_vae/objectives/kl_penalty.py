"""ELBO objectives that penalise the KL itself: capacity annealing and free bits.

Both split the ELBO into E_q[log p(x|z)] - KL(q(z|x) || p(z)) and replace the KL term:

- capacity (Burgess et al. 2018, "Understanding disentangling in beta-VAE"):
  loss = -E_q[log p(x|z)] + gamma * |KL - C|, with C raised during training;
- free bits (Kingma et al. 2016, "Improved variational inference with IAF", eq. 15):
  loss = -E_q[log p(x|z)] + beta * sum_j max(lambda, E_x[KL_j]), KL_j the KL of latent
  dimension j averaged over the batch, so the KL term never pushes a dimension below lambda.

Each site's KL is in closed form where ``objectives.kl`` finds it valid (torch knows it and the
prior depends only on latents the guide drew before the site), else the Monte Carlo estimate
log q(z) - log p(z) from the same particles. Per-dimension KLs (free bits) need prior
and guide that factorize over dimensions (``Independent``). The ELBO split exists only for the
ELBO estimators (``elbo``, ``meanfield``); importance-weighted bounds have no separate KL term,
so asking for these penalties with them is an error. With no penalty given (beta = 1,
capacity None, free_bits 0), ``forward`` is the negative ELBO, which the loop reports as loss.
"""

from __future__ import annotations

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO

from pyro_vae.errors import KLNotAvailableError
from pyro_vae.objectives.base import Objective, _to_particle_data_shape, site_log_prob, traces
from pyro_vae.objectives.kl import _unexpand, factors, is_latent, site_kls
from pyro_vae.sites import observed_sites


def kl_terms(model_trace, guide_trace, per_dimension: bool = True) -> torch.Tensor:
    """KL(q || p) of every latent site, a tensor (particles, batch, dims).

    ``per_dimension``: one column per latent dimension (needs factorized q and p), else one
    column per latent site. Each site's KL is in closed form where ``objectives.kl`` finds that
    valid, else log q(z) - log p(z) from the same particles (``kl_methods`` says which).
    """
    columns = []
    for name, (_, kl) in site_kls(model_trace, guide_trace, per_dimension).items():
        q_site = guide_trace.nodes[name]
        if name not in model_trace.nodes:
            raise KLNotAvailableError(f"guide site {name!r} has no prior in the model, so it has no "
                                      f"KL term; sample it in the model too, or train without "
                                      f"--free-bits and --capacity")
        q, p, z = q_site["fn"], model_trace.nodes[name]["fn"], q_site["value"]
        batch = z.shape[: z.dim() - len(q.event_shape)]
        qf, pf = factors(q), factors(p)
        if per_dimension and len(q.event_shape) > 0 and (qf is None or pf is None):
            raise KLNotAvailableError(
                f"free bits need the KL of each latent dimension, but site {name!r} has guide "
                f"{type(_unexpand(q)).__name__} and prior {type(_unexpand(p)).__name__}, which do not "
                f"factorize over dimensions. Use --capacity (a floor on the total KL is not free "
                f"bits) or --beta with this model and guide, or a factorized prior and guide."
            )
        split = per_dimension and qf is not None and pf is not None
        if kl is None:  # Monte Carlo, from the same particles
            kl = qf.log_prob(z) - pf.log_prob(z) if split else q.log_prob(z) - p.log_prob(z)
        kl = kl.expand(*batch, *kl.shape[len(batch):]).reshape(*batch, -1)
        mask = q_site["mask"]
        columns.append(scale_and_mask(kl if split else kl.sum(-1, keepdim=True),
                                      mask=mask.unsqueeze(-1) if torch.is_tensor(mask) else mask))
    return torch.cat(columns, dim=-1)


def check_reparameterized(guide_trace) -> None:
    """Free bits and capacity differentiate the KL and log p(x|z) pathwise: refuse a guide site
    without a reparameterized sampler (its score-function term would be lost)."""
    for name, site in guide_trace.nodes.items():
        if is_latent(site) and not site["fn"].has_rsample:
            raise KLNotAvailableError(
                f"free bits and capacity need reparameterized guide sites, but {name!r} "
                f"({type(_unexpand(site['fn'])).__name__}) has no rsample; weight the KL with "
                f"--beta, --warmup-epochs or --cycle-epochs instead, which keep its score-function "
                f"term")


def check_elbo_estimator(estimator) -> None:
    if not isinstance(estimator, Trace_ELBO):
        raise KLNotAvailableError(
            f"capacity annealing and free bits replace the KL term of the ELBO E_q[log p(x|z)] - "
            f"KL(q || p), but the estimator {type(estimator).__name__} has no separate KL term. "
            f"Use --estimator elbo or meanfield with them, or weight the KL with --beta, "
            f"--warmup-epochs or --cycle-epochs, which work with every estimator."
        )


class KLPenaltyObjective(Objective):
    """-E_q[log p(x|z)] + penalty(KL), per data point: the objective for capacity and free bits.

    ``forward(x, beta=1, capacity=None, free_bits=0)``: with ``capacity`` C the penalty is
    gamma * |E_x KL - C|; otherwise beta * sum_j max(free_bits, E_x KL_j).
    """

    def __init__(self, model, guide, estimator, gamma: float = 1000.0):
        check_elbo_estimator(estimator)
        super().__init__(model, guide, estimator)
        self.gamma = gamma

    def forward(self, x, beta: float = 1.0, capacity: float | None = None, free_bits: float = 0.0,
                **context):
        k = self.estimator.num_particles
        model_trace, guide_trace = traces(self.model, self.guide, x, k, **context)
        if torch.is_grad_enabled():
            check_reparameterized(guide_trace)
        log_lik = sum(_to_particle_data_shape(site_log_prob(s), k, x.shape[0])
                      for s in observed_sites(model_trace))
        kl = kl_terms(model_trace, guide_trace, per_dimension=free_bits > 0)
        kl = kl.reshape(-1, kl.shape[-1]).mean(0)  # E over particles and the batch, per column
        if capacity is not None:
            penalty = self.gamma * (kl.sum() - capacity).abs()
        else:
            penalty = beta * kl.clamp(min=free_bits).sum()
        return -log_lik.mean() + penalty


def make_objective(model, guide, estimator, schedule=None) -> Objective:
    """The objective the schedule needs: ``KLPenaltyObjective`` for capacity or free bits, else
    the plain ``Objective`` (beta on the latent sites, any estimator)."""
    if schedule is not None and schedule.needs_kl:
        return KLPenaltyObjective(model, guide, estimator, gamma=schedule.gamma)
    return Objective(model, guide, estimator)


@torch.no_grad()
def kl_per_dimension(model, guide, x, num_particles: int = 1, **context) -> torch.Tensor:
    """E_x KL(q(z_j|x) || p(z_j)) for each latent dimension j, a tensor (dims,) in nats."""
    kl = kl_terms(*traces(model, guide, x, num_particles, **context), per_dimension=True)
    return kl.reshape(-1, kl.shape[-1]).mean(0)
