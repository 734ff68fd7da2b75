"""Pyro's Trace_ELBO and TraceMeanField_ELBO, with the same estimates and gradients, minus the
host synchronisations.

Pyro's ``differentiable_loss`` calls ``.item()`` on every site's log-density and on the loss
(and, with validation on, checks each for NaN) in every step. On a GPU each of those stalls the
host until the device has caught up, so the step can no longer run ahead. These subclasses build
the same surrogate objective from the same traces and return it without reading it back.
"""

from __future__ import annotations

from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from torch.distributions import kl_divergence


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
    """E_q[log p(x|z)] - KL(q(z|x) || p(z)), the KL in closed form where torch has it
    (Kingma & Welling 2014, appendix B), else by sampling."""

    @staticmethod
    def _surrogate_elbo(model_trace, guide_trace):
        elbo = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                elbo = elbo + site["log_prob_sum"]
                continue
            guide_site = guide_trace.nodes[name]
            try:
                kl = kl_divergence(guide_site["fn"], site["fn"])
                elbo = elbo - scale_and_mask(kl, guide_site["scale"], guide_site["mask"]).sum()
            except NotImplementedError:
                elbo = elbo + site["log_prob_sum"] - guide_site["score_parts"].entropy_term.sum()
        for name, guide_site in guide_trace.nodes.items():  # auxiliary guide sites
            if guide_site["type"] == "sample" and name not in model_trace.nodes:
                elbo = elbo - guide_site["score_parts"].entropy_term.sum()
        return elbo
