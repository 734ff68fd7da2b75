"""Where the closed-form KL may stand in for a latent site's sampled term, and what it is.

The ELBO is a sum over latent sites s of E_q[log p(z_s | pa(z_s)) - log q(z_s | .)] plus the
likelihood. Conditioning on the guide's draws before s (tower rule), the term for s equals
-E_q[KL(q(z_s | .) || p(z_s | pa(z_s)))] provided p's parameters pa(z_s) are known once those
earlier draws are: then the KL may replace the sampled log p - log q, with the same expectation
and a lower variance (Kingma & Welling 2014, appendix B). This is Pyro's mean-field requirement
(``TraceMeanField_ELBO``: "for every latent variable z in the guide, its parents in the model
must not include any latent variables that are descendants of z in the guide").

``kl_methods`` decides it from the traces' structure alone (site order, distribution types,
mask objects), never from tensor values, so it costs no host read and traces under --jit:

- the closed form is used for site s when torch knows KL(q || p) for the pair, model and guide
  mask s alike, and every model latent that precedes s in the model (the only sites p(z_s | .)
  can depend on) was drawn by the guide before s (sufficient, not necessary: a site whose prior
  ignores such a latent still gets the Monte Carlo term, which is only noisier);
- everywhere else the site keeps the Monte Carlo term log p(z_s | .) - log q(z_s | .) from the
  same particles, and the method says why.

This decides the *value*. For gradients, ``MeanFieldELBO`` adds that every guide site must be
reparameterized; a trace with a score-function site is estimated as ``elbo`` estimates it.
"""

from __future__ import annotations

import torch
from pyro.distributions import Independent, MaskedDistribution
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.distributions.util import broadcast_shape, scale_and_mask
from torch.distributions import kl_divergence

from pyro_vae.sites import is_latent

CLOSED_FORM = "closed form"
MONTE_CARLO = "monte carlo"


def latent_names(trace) -> list[str]:
    return [name for name, site in trace.nodes.items() if is_latent(site)]


def _same(a, b) -> bool:
    """True when two masks or scales are certainly equal: one object, or equal plain values."""
    if a is b:
        return True
    return not torch.is_tensor(a) and not torch.is_tensor(b) and a == b


def _unmask(d):
    """(d without an outer ``.mask(m)``, m or None)."""
    return (d.base_dist, d._mask) if isinstance(d, MaskedDistribution) else (d, None)


def _unexpand(d):
    while isinstance(d, ExpandedDistribution):
        d = d.base_dist
    return d


def factors(d):
    """The elementwise factors of ``d`` (an ``Independent`` of a scalar distribution, its event
    dims moved to batch dims), or None if it has none."""
    d = _unexpand(d)
    if not isinstance(d, Independent):
        return None
    while isinstance(d, Independent):
        d = _unexpand(d.base_dist)
    return d if d.event_shape == () else None


def closed_form_kl(q, p, per_dimension: bool = False) -> torch.Tensor | None:
    """KL(q || p) from torch's registry, shaped like the pair's batch (with the event dimension
    kept when ``per_dimension`` and both factorize), or None where there is no closed form
    (torch has none for the pair, or ``.mask(m)`` masks differ)."""
    (q, mask), (p, p_mask) = _unmask(q), _unmask(p)
    if not _same(mask, p_mask):
        return None
    shape = batch = broadcast_shape(q.batch_shape, p.batch_shape)
    qf, pf = (factors(q), factors(p)) if per_dimension else (None, None)
    if qf is not None and pf is not None:
        q, p, shape = qf, pf, batch + q.event_shape
    try:
        kl = kl_divergence(_unexpand(q), _unexpand(p))
    except NotImplementedError:
        return None
    kl = kl.expand(shape)
    if torch.is_tensor(mask):  # a per-element mask: reach the event dimension kept, if any
        mask = mask.reshape(mask.shape + (1,) * (len(shape) - len(batch)))
    return scale_and_mask(kl, mask=mask)


def _why_not(name, model_trace, guide_trace, model_order, guide_index) -> str | None:
    """Why site ``name`` keeps its Monte Carlo term (structure only), or None."""
    if name not in model_trace.nodes:
        return "a guide-only site: its log q is an entropy term with no prior"
    later = [t for t in model_order[: model_order.index(name)]
             if guide_index.get(t, len(guide_index)) > guide_index[name]]
    if later:
        return f"its prior may depend on {later[0]!r}, which the guide draws after it"
    model_site, guide_site = model_trace.nodes[name], guide_trace.nodes[name]
    if not (_same(model_site["mask"], guide_site["mask"])
            and _same(_unmask(model_site["fn"])[1], _unmask(guide_site["fn"])[1])):
        return "model and guide mask it differently"
    return None


def site_kls(model_trace, guide_trace, per_dimension: bool = False) -> dict:
    """For each latent site of the guide, (method, KL): ``("closed form", KL(q || p))`` where
    the closed form is valid (see the module docstring), else ``("monte carlo (why)", None)``.

    The KL is unscaled and unmasked by the site (``site_kl`` applies them); ``per_dimension``
    keeps the event dimension of factorized (``Independent``) pairs.
    """
    model_order, guide_order = latent_names(model_trace), latent_names(guide_trace)
    guide_index = {name: i for i, name in enumerate(guide_order)}
    out = {}
    for name in guide_order:
        why = _why_not(name, model_trace, guide_trace, model_order, guide_index)
        kl = None
        if why is None:
            q, p = guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"]
            kl = closed_form_kl(q, p, per_dimension)
            if kl is None:
                why = (f"torch has no closed-form KL({_name(q)} || {_name(p)})")
        out[name] = (CLOSED_FORM, kl) if why is None else (f"{MONTE_CARLO} ({why})", None)
    return out


def kl_methods(model_trace, guide_trace) -> dict[str, str]:
    """For each latent site of the guide, ``"closed form"`` or ``"monte carlo (why)"``."""
    return {name: method for name, (method, _) in site_kls(model_trace, guide_trace).items()}


def _name(d) -> str:
    d = _unexpand(_unmask(d)[0])
    if isinstance(d, Independent):
        return f"{_name(d.base_dist)}.to_event({d.reinterpreted_batch_ndims})"
    return type(d).__name__


def site_kl(model_site, guide_site, kl: torch.Tensor) -> torch.Tensor:
    """The closed-form term of a site, scaled and masked as the ELBO's terms are: s_q KL, plus
    the Monte Carlo term (s_q - s_p) log p(z) where the scales may differ (a KL weight given as
    a tensor makes them distinct objects), so that its expectation is always
    s_q E_q[log q] - s_p E_q[log p]."""
    term = scale_and_mask(kl, guide_site["scale"], guide_site["mask"])
    if not _same(model_site["scale"], guide_site["scale"]):
        log_p = model_site.get("unscaled_log_prob")  # computed already in the ELBO's traces
        if log_p is None:
            log_p = model_site["fn"].log_prob(model_site["value"])
        term = term + scale_and_mask(log_p, guide_site["scale"] - model_site["scale"], model_site["mask"])
    return term
