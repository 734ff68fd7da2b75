"""Importance-weighted bounds and their gradient estimators, as ``pyro.infer.ELBO`` subclasses.

Every estimator here works on the (K, B) log-weights of ``base.traces``/``base.log_weight_parts``
(K vectorized particles per data point, B data points in the ``data`` plate)::

    log w_k(x) = log p(x | z_k) + beta * (log p(z_k) - log q(z_k | x)),   z_k ~ q(z | x)

and takes its logsumexp over particles *separately for each data point*. ``beta`` is the KL
weight: ``Objective`` scales every latent sample site of model and guide by it (``ScaleLatents``),
so beta multiplies log p(z) - log q(z|x) *inside* each log-weight, before the logsumexp. For
K = 1 this is exactly E_q[log p(x|z)] - beta KL(q || p); for K > 1 it is the IWAE bound of the
tempered joint p(x|z) p(z)^beta / q(z|x)^beta (Pyro's RenyiELBO instead multiplies the summed
log-weight of the whole batch, after scaling, which is not the same thing).

``differentiable_loss(model, guide, x)`` returns the batch **sum** of the negative bound, as
Pyro's ELBOs do; ``Objective`` divides by the batch size. Its value is always the bound; its
gradient is the estimator's (a surrogate ``s`` with ``value = bound + s - s.detach()``).

Every guide site must be reparameterizable (``has_rsample``); the error says which is not.
"""

from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.util import site_is_subsample

from pyro_vae.objectives.base import log_weight_parts, traces, vectorize


class NotReparameterizedError(ValueError):
    """A guide site without ``rsample`` given to a reparameterized-gradient estimator."""


def _check_positive_int(name: str, value) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _latent_sites(trace):
    return [(n, s) for n, s in trace.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]


def _replay(model, guide_trace, x, num_particles, max_plate_nesting, value_fn, **context):
    """Trace ``model`` replayed on ``guide_trace`` with each latent value replaced by
    ``value_fn(name, value)``; returns (model trace, the guide trace with the replaced values).

    With ``value.detach()`` the model sees stopped samples (no path to the guide); with
    ``ScaleGrad``, what log w sends back to the guide is scaled by the importance weights.
    """
    replaced = guide_trace.copy()
    for name, site in _latent_sites(guide_trace):
        replaced.nodes[name] = {**site, "value": value_fn(name, site["value"])}
    model_trace = poutine.trace(
        poutine.replay(vectorize(model, num_particles, max_plate_nesting), trace=replaced)
    ).get_trace(x, **context)
    return model_trace, replaced


def _log_mean_exp(lw: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(lw, dim) - math.log(lw.shape[dim])


class ImportanceWeightedELBO(ELBO):
    """IWAE bound (Burda et al. 2016): per data point, log (1/K) sum_k w_k, with the total
    reparameterized gradient. Subclasses change ``bound`` (the value from the (K, B) log
    weights) or ``surrogate`` (the gradient).

    :param K: particles per data point, vectorized (``--particles``).
    :param max_plate_nesting: plates in the model besides the particle plate (the ``data`` plate).
    """

    name = "iwae"
    detach_guide_params = False  # True: the path derivative (Roeder et al. 2017)

    def __init__(self, K: int = 1, max_plate_nesting: int = 1):
        super().__init__(num_particles=_check_positive_int("K", K),
                         max_plate_nesting=max_plate_nesting, vectorize_particles=True)

    # -- the math ----------------------------------------------------------------------------
    def bound(self, lw: torch.Tensor) -> torch.Tensor:
        """(K, B) log weights -> the bound per data point, (B,)."""
        return _log_mean_exp(lw)

    def surrogate(self, model, guide, x, **context) -> tuple[torch.Tensor, torch.Tensor]:
        """(bound, surrogate), each (B,): the surrogate's gradient is the estimator's."""
        model_trace, guide_trace = traces(model, guide, x, self.num_particles,
                                          self.max_plate_nesting, **context)
        self._check_reparameterized(guide_trace)
        lw = self._log_weights(model_trace, guide_trace, x, self.detach_guide_params)
        b = self.bound(lw)
        return b, b

    # -- helpers -----------------------------------------------------------------------------
    def _log_weights(self, model_trace, guide_trace, x, detach_guide_params=False):
        log_p, log_q = log_weight_parts(model_trace, guide_trace, self.num_particles, x.shape[0],
                                        detach_guide_params)
        return log_p - log_q

    def _guide_trace(self, guide, x, **context):
        trace = poutine.trace(vectorize(guide, self.num_particles, self.max_plate_nesting)).get_trace(x, **context)
        self._check_reparameterized(trace)
        return trace

    def _check_reparameterized(self, guide_trace) -> None:
        for name, site in _latent_sites(guide_trace):
            if not site["fn"].has_rsample:
                raise NotReparameterizedError(
                    f"guide site {name!r} ({type(site['fn']).__name__}) cannot be reparameterized, "
                    f"so the {self.name!r} estimator cannot differentiate through its samples. Use "
                    f"'elbo' (score-function gradients) or 'enum' (enumerates discrete sites) "
                    f"instead, or a reparameterizable distribution (e.g. RelaxedOneHotCategorical)."
                )

    # -- the pyro.infer.ELBO interface -------------------------------------------------------
    def _get_trace(self, model, guide, args, kwargs):
        """(model trace, guide trace) with K vectorized particles, as Pyro's ELBOs give."""
        return traces(model, guide, args[0], self.num_particles, self.max_plate_nesting, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Sum over the batch of the negative bound; its gradient is the estimator's."""
        if len(args) != 1:
            raise TypeError(f"{self.name} expects model(x, **context); got {len(args)} positional arguments")
        value, surrogate = self.surrogate(model, guide, args[0], **kwargs)
        if surrogate is not value:
            value = surrogate + (value - surrogate).detach()
        return -value.sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())

    def __repr__(self):
        return f"{type(self).__name__}(K={self.num_particles})"


class IWAE(ImportanceWeightedELBO):
    """IWAE_K = E log (1/K) sum_k w_k (Burda et al. 2016), total reparameterized gradient."""


class STL(ImportanceWeightedELBO):
    """Sticking the landing (Roeder et al. 2017): the IWAE_K bound with the path-derivative
    gradient, dropping the score term by stopping gradients through q's parameters in log q.
    K = 1 is the ELBO with an unbiased, lower-variance guide gradient (zero at the exact
    posterior); for K > 1 ("IWAE-STL") the guide gradient is biased (Tucker et al. 2019, sec. 5)."""

    name = "stl"
    detach_guide_params = True


class DReG(ImportanceWeightedELBO):
    """Doubly reparameterized gradients (Tucker et al. 2019) for the IWAE_K bound.

    With normalized weights w~_k = w_k / sum_j w_j, the guide gets
    sum_k w~_k^2 d log w_k / dz_k  dz_k / dphi  (log q with stopped parameters), the model gets
    the ordinary IWAE gradient sum_k w~_k d log p(x, z_k) / dtheta. One forward pass: the
    surrogate sum_k w~_k log w_k (stop-gradient w~) gives the model's gradient, and each latent
    value reaches the model through ``ScaleGrad``, which multiplies what flows back into the
    guide by w~_k once more (the form used in public DReG code, e.g. the MMVAE objectives). The
    weights are written into its buffer once the model has scored the samples; being tensor
    operations, not hooks, this survives ``torch.jit.trace`` (``--jit``).
    """

    name = "dreg"

    def surrogate(self, model, guide, x, **context):
        guide_trace = self._guide_trace(guide, x, **context)
        buffers = {name: _weight_buffer(site, self.num_particles, x.shape[0])
                   for name, site in _latent_sites(guide_trace) if site["value"].requires_grad}
        model_trace, scaled = _replay(model, guide_trace, x, self.num_particles, self.max_plate_nesting,
                                      lambda name, v: ScaleGrad.apply(v, buffers[name]) if name in buffers else v,
                                      **context)
        lw = self._log_weights(model_trace, scaled, x, detach_guide_params=True)
        w = torch.softmax(lw.detach(), 0)
        for buffer in buffers.values():
            buffer.copy_(w.reshape(buffer.shape))
        return _log_mean_exp(lw.detach()), (w * lw).sum(0)


class ScaleGrad(torch.autograd.Function):
    """Identity on the way forward; on the way back, the gradient times ``weight``, a buffer the
    caller fills after the forward pass (DReG's weights exist only once the model has run)."""

    @staticmethod
    def forward(ctx, value, weight):
        ctx.weight = weight  # not saved_tensors: it is written after this call, by design
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.weight, None


def _weight_buffer(site, k: int, b: int) -> torch.Tensor:
    """An empty (K, 1.., B, 1..) tensor that broadcasts (K, B) weights over a site's value
    (particles first, data last among its batch dims, then its event dims)."""
    event_dim = site["fn"].event_dim
    batch_dims = site["value"].dim() - event_dim
    shape = (k,) + (1,) * (batch_dims - 2) + (b,) + (1,) * event_dim
    return site["value"].new_empty(shape)


class MIWAE(ImportanceWeightedELBO):
    """MIWAE_{M,K} = (1/M) sum_m log (1/K) sum_k w_mk (Rainforth et al. 2018): M independent
    IWAE_K bounds averaged; M*K particles, vectorized."""

    name = "miwae"

    def __init__(self, M: int = 1, K: int = 1, max_plate_nesting: int = 1):
        self.M, self.K = _check_positive_int("M", M), _check_positive_int("K", K)
        super().__init__(M * K, max_plate_nesting)

    def bound(self, lw):
        return _log_mean_exp(lw.reshape(self.M, self.K, -1), 1).mean(0)

    def __repr__(self):
        return f"{type(self).__name__}(M={self.M}, K={self.K})"


class CIWAE(ImportanceWeightedELBO):
    """CIWAE_beta = beta ELBO_K + (1 - beta) IWAE_K on the same K particles (Rainforth et al.
    2018). ``beta`` here is the mixing weight, not the KL weight of ``--beta``."""

    name = "ciwae"

    def __init__(self, beta: float = 0.5, K: int = 1, max_plate_nesting: int = 1):
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"ciwae's beta mixes ELBO and IWAE and must lie in [0, 1], got {beta}")
        self.beta = float(beta)
        super().__init__(K, max_plate_nesting)

    def bound(self, lw):
        return self.beta * lw.mean(0) + (1.0 - self.beta) * _log_mean_exp(lw)

    def __repr__(self):
        return f"{type(self).__name__}(beta={self.beta}, K={self.num_particles})"


class PIWAE(MIWAE):
    """PIWAE (Rainforth et al. 2018): the model ascends IWAE_{M*K}, the guide MIWAE_{M,K}, on the
    same M*K particles. The loss value is -IWAE_{M*K}.

    Surrogate: MIWAE(lw) + IWAE(lw_theta) - MIWAE(lw_theta), where lw_theta replays the model on
    stopped samples with log q stopped, so it carries the model's gradient only (one extra model
    pass): the guide's gradient is MIWAE's, the model's IWAE's.
    """

    name = "piwae"

    def surrogate(self, model, guide, x, **context):
        guide_trace = self._guide_trace(guide, x, **context)
        model_trace, _ = _replay(model, guide_trace, x, self.num_particles,
                                 self.max_plate_nesting, lambda name, v: v, **context)
        lw = self._log_weights(model_trace, guide_trace, x)
        stopped_trace, stopped = _replay(model, guide_trace, x, self.num_particles,
                                         self.max_plate_nesting, lambda name, v: v.detach(), **context)
        lw_theta = self._log_weights(stopped_trace, stopped, x, detach_guide_params=True)
        iwae = _log_mean_exp(lw_theta)
        return iwae, self.bound(lw) + iwae - self.bound(lw_theta)


class Renyi(ImportanceWeightedELBO):
    """Renyi (variational Renyi) bound of Li & Turner (2016), per data point:
    L_alpha = 1/(1 - alpha) log (1/K) sum_k w_k^(1 - alpha); alpha = 0 is IWAE_K, alpha -> 1 the
    ELBO (alpha = 1 is taken as the ELBO). Reparameterized gradient.

    Implemented on the log weights rather than wrapping Pyro's RenyiELBO, which has no
    ``differentiable_loss`` and takes one logsumexp over the log weight summed over the whole
    batch; for a batch of one point and no scaling the two agree (tested).
    """

    name = "renyi"

    def __init__(self, alpha: float = 0.0, K: int = 1, max_plate_nesting: int = 1):
        self.alpha = float(alpha)
        super().__init__(K, max_plate_nesting)

    def bound(self, lw):
        if self.alpha == 1.0:
            return lw.mean(0)
        return _log_mean_exp((1.0 - self.alpha) * lw) / (1.0 - self.alpha)

    def __repr__(self):
        return f"{type(self).__name__}(alpha={self.alpha}, K={self.num_particles})"
