"""Pyro's Trace_ELBO and TraceMeanField_ELBO, with the same estimates and gradients, minus the
host synchronisations.

Pyro's ``differentiable_loss`` calls ``.item()`` on every site's log-density and on the loss
(and, with validation on, checks each for NaN) in every step. On a GPU each of those stalls the
host until the device has caught up, so the step can no longer run ahead. These subclasses build
the same surrogate objective from the same traces and return it without reading it back.
"""

from __future__ import annotations

import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import torch_item

from pyro_vae.objectives.kl import MONTE_CARLO, is_latent, kl_methods, site_kl, site_kls


def elbo_value(model_trace, guide_trace):
    """log p(x, z) - log q(z|x) summed over the traces' sample sites."""
    log_p = sum(s["log_prob_sum"] for s in model_trace.nodes.values() if s["type"] == "sample")
    return log_p - sum(s["log_prob_sum"] for s in guide_trace.nodes.values() if s["type"] == "sample")


class _SyncFreeLoss:
    def differentiable_loss(self, model, guide, *args, **kwargs):
        """Negative surrogate ELBO, averaged over particles; a tensor, never read back."""
        elbo = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo = elbo + self._surrogate_elbo(model_trace, guide_trace)
        return -elbo / self.num_particles

    def _get_traces(self, model, guide, args, kwargs):
        """Pyro's traces (every path: ``loss``, ``loss_and_grads``, ``differentiable_loss``),
        the particle layout chosen first."""
        if self.vectorize_particles and self.num_particles > 1 and not getattr(self, "_layout_known", False):
            self._choose_particle_layout(model, guide, args, kwargs)
        return super()._get_traces(model, guide, args, kwargs)

    def _choose_particle_layout(self, model, guide, args, kwargs) -> None:
        """Once: the plate nesting (guessed without touching the random numbers or a ``--jit``
        trace, where it was not given) and, for programs that do not broadcast over a particle
        dimension, Pyro's loop over particles instead of the vectorized plate (said once)."""
        from pyro_vae.objectives.base import REPEATED, guess_max_plate_nesting, particle_layout

        if self.max_plate_nesting == float("inf"):  # Pyro counts the particle plate in
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs) + 1
        plates = self.max_plate_nesting - 1
        if particle_layout(model, guide, args, kwargs, plates, self.num_particles) == REPEATED:
            self.vectorize_particles, self.max_plate_nesting = False, plates  # Pyro's loop over particles
        self._layout_known = True


class TraceELBO(_SyncFreeLoss, Trace_ELBO):
    """E_q[log p(x, z) - log q(z|x)] (Ranganath et al. 2014; Kingma & Welling 2014): the
    reparameterized gradient for reparameterizable sites, score-function terms for the rest."""

    @staticmethod
    def _surrogate_elbo(model_trace, guide_trace):
        """The ELBO's value, with the gradient of Pyro's surrogate (score terms included)."""
        elbo = sum(s["log_prob_sum"] for s in model_trace.nodes.values() if s["type"] == "sample")
        log_r, score = None, 0.0
        for site in guide_trace.nodes.values():
            if site["type"] != "sample":
                continue
            _, score_function_term, entropy_term = site["score_parts"]
            if not is_identically_zero(entropy_term):
                elbo = elbo - entropy_term.sum()
            if not is_identically_zero(score_function_term):
                if log_r is None:
                    log_r = _compute_log_r(model_trace, guide_trace)
                score = score + (log_r.sum_to(site["cond_indep_stack"]) * score_function_term).sum()
        if isinstance(score, float):  # all sites reparameterized: the surrogate is the ELBO
            return elbo
        surrogate = elbo + score
        value = elbo_value(model_trace, guide_trace)
        return value.detach() + surrogate - surrogate.detach()


class MeanFieldELBO(_SyncFreeLoss, TraceMeanField_ELBO):
    """E_q[log p(x|z)] - sum_s E_q KL(q(z_s|.) || p(z_s|.)), each site's KL in closed form where
    that is valid (Kingma & Welling 2014, appendix B), else its Monte Carlo term log p - log q
    from the same particles: an unbiased ELBO estimate for any program, with lower variance
    where a closed form applies.

    Per site (``objectives.kl.site_kls``): the closed form needs torch's KL for the pair, equal
    masks, and every model latent before the site drawn by the guide before it (Pyro's
    mean-field requirement, here checked, not assumed). The closed-form gradient is pathwise, so
    a trace with a site that is not reparameterized (a Bernoulli latent) is estimated as
    ``TraceELBO`` estimates it, with score-function terms. ``kl_methods`` says which term each
    site gets.
    """

    def _get_trace(self, model, guide, args, kwargs):
        return Trace_ELBO._get_trace(self, model, guide, args, kwargs)  # no order warning: checked

    @staticmethod
    def _surrogate_elbo(model_trace, guide_trace):
        if _score_function_site(guide_trace) is not None:
            return TraceELBO._surrogate_elbo(model_trace, guide_trace)
        elbo = 0.0
        for name, site in model_trace.nodes.items():  # likelihood, and latents the guide lacks
            if site["type"] == "sample" and name not in guide_trace.nodes:
                elbo = elbo + site["log_prob_sum"]
        for name, (_, kl) in site_kls(model_trace, guide_trace).items():
            guide_site = guide_trace.nodes[name]
            if kl is not None:
                elbo = elbo - site_kl(model_trace.nodes[name], guide_site, kl).sum()
                continue
            if name in model_trace.nodes:
                elbo = elbo + model_trace.nodes[name]["log_prob_sum"]
            elbo = elbo - guide_site["log_prob_sum"]  # reparameterized: the entropy term
        return elbo

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        """(loss, surrogate loss) of one trace, for Pyro's ``loss`` and ``loss_and_grads`` (SVI)."""
        elbo = self._surrogate_elbo(model_trace, guide_trace)
        return -torch_item(elbo), -elbo

    @torch.no_grad()
    def kl_methods(self, model, guide, *args, **kwargs) -> dict[str, str]:
        """For each latent site of one trace of ``guide``: ``"closed form"`` or ``"monte carlo
        (why)"``, as ``differentiable_loss`` treats it."""
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        methods = kl_methods(model_trace, guide_trace)
        site = _score_function_site(guide_trace)
        if site is not None:
            why = (f"{site!r} is not reparameterized, so the trace keeps Trace_ELBO's "
                   f"score-function terms")
            methods = {name: f"{MONTE_CARLO} ({why})" for name in methods}
        return methods


def _score_function_site(guide_trace) -> str | None:
    """The first latent guide site without a reparameterized sampler, or None."""
    for name, site in guide_trace.nodes.items():
        if is_latent(site) and not site["fn"].has_rsample:
            return name
    return None
