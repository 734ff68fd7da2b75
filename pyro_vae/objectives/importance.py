"""Importance-weighted bounds and their gradient estimators, as ``pyro.infer.ELBO`` subclasses.

Every estimator here works on the (K, B) log-weights of ``base.importance_log_weights`` (K
vectorized particles, B data points of the data plate, found by tracing)::

    log w_bk = log p(x_b | z_bk) + beta * (log p(z_bk) - log q(z_bk | x_b)),   z_bk ~ q(z | x_b)

and takes its logsumexp over particles *separately for each data point*. A subsampling factor
s = N/B (``plate(N, subsample_size=B)`` or ``poutine.scale``) multiplies the bound from outside,
s * sum_b bound(log w_b.), with log w from unscaled densities, so that the bound stays a bound.
``beta`` is the KL weight: ``Objective`` scales every latent sample site of model and guide by it
(``ScaleLatents``), so beta multiplies log p(z) - log q(z|x) *inside* each log-weight, before the
logsumexp. For K = 1 this is exactly E_q[log p(x|z)] - beta KL(q || p); for K > 1 it is the IWAE
bound of the tempered joint p(x|z) p(z)^beta / q(z|x)^beta.

A program with a latent outside the data plate (a global latent) gets one weight per particle
for the whole batch, global terms once (B = 1 above, as in Pyro's RenyiELBO); at K = 1 every
estimator here equals Trace_ELBO on any program.

``differentiable_loss(model, guide, *args, **kwargs)`` takes the programs' arguments as any
``pyro.infer.ELBO`` does and returns the **sum** over the batch of the negative bound, as Pyro's
ELBOs do; ``Objective`` divides by the batch size. Its value is always the bound; its gradient
is the estimator's (a surrogate ``s`` with ``value = bound + s - s.detach()``).

Every guide site must be reparameterizable (``has_rsample``); the error says which is not.
"""

from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled

from pyro_vae.errors import ConfigError, NotReparameterizedError
from pyro_vae.objectives.base import (
    REPEATED,
    VECTORIZED,
    ImportanceWeights,
    guess_max_plate_nesting,
    importance_log_weights,
    pair_traces,
    particle_layout,
    repeat_rows,
    validate_traces,
    vectorize,
)
from pyro_vae.sites import latent_sites


def check_positive_int(name: str, value) -> int:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _latent_sites(trace):
    return [(s["name"], s) for s in latent_sites(trace)]


def _replay(model, guide_trace, args, kwargs, num_particles, plates, value_fn, layout=VECTORIZED):
    """Trace ``model`` replayed on ``guide_trace`` with each latent value replaced by
    ``value_fn(name, value)``; returns (model trace, the guide trace with the replaced values).

    With ``value.detach()`` the model sees stopped samples (no path to the guide); with
    ``ScaleGrad``, what log w sends back to the guide is scaled by the importance weights.
    """
    replaced = guide_trace.copy()
    for name, site in _latent_sites(guide_trace):
        replaced.nodes[name] = {**site, "value": value_fn(name, site["value"])}
    if layout == REPEATED:
        args, kwargs = repeat_rows(args, kwargs, num_particles)
        model_trace = poutine.trace(poutine.replay(model, trace=replaced)).get_trace(*args, **kwargs)
        model_trace.repeated_particles = replaced.repeated_particles = num_particles
    else:
        model_trace = poutine.trace(
            poutine.replay(vectorize(model, num_particles, plates), trace=replaced)
        ).get_trace(*args, **kwargs)
    if is_validation_enabled():  # Pyro's checks, as pair_traces does
        validate_traces(model_trace, guide_trace, plates + (layout != REPEATED))
    return model_trace, replaced


def _log_mean_exp(lw: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(lw, dim) - math.log(lw.shape[dim])


class ImportanceWeightedELBO(ELBO):
    """IWAE bound (Burda et al. 2016): per data point, log (1/K) sum_k w_k, with the total
    reparameterized gradient. Subclasses change ``bound`` (the value from the (K, B) log
    weights) or ``surrogate`` (the gradient).

    :param K: particles per data point, vectorized (``--particles``).
    :param max_plate_nesting: plates in the programs besides the particle plate; guessed from
        one trace at the first call when not given (``inf``), as Pyro's ELBOs do. The particle
        plate sits at dim ``-self.max_plate_nesting``, left of every plate, for any K.
    """

    name = "iwae"
    detach_guide_params = False  # True: the path derivative (Roeder et al. 2017)

    def __init__(self, K: int = 1, max_plate_nesting: float = float("inf")):
        super().__init__(num_particles=check_positive_int("K", K), vectorize_particles=True)
        self.max_plate_nesting = max_plate_nesting + 1  # the particle plate included, for every K
        self.layout = None  # VECTORIZED or REPEATED, decided at the first call (particle_layout)

    # -- the math ----------------------------------------------------------------------------
    def bound(self, lw: torch.Tensor) -> torch.Tensor:
        """(K, B) log weights -> the bound per data point, (B,)."""
        return _log_mean_exp(lw)

    def surrogate(self, model, guide, args, kwargs) -> tuple[torch.Tensor, torch.Tensor, object]:
        """(bound, surrogate, scale): bound and surrogate per data point (B,), the surrogate's
        gradient the estimator's; the loss is -scale * sum_b."""
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        self._check_reparameterized(guide_trace)
        w = importance_log_weights(model_trace, guide_trace, self.detach_guide_params)
        b = self.bound(w.log_w)
        return b, b, w.scale

    # -- helpers -----------------------------------------------------------------------------
    def _plates(self, model, guide, args, kwargs) -> int:
        """The programs' plate nesting (the particle plate left out), guessed once if not given;
        and, once, how the particles are laid out (``particle_layout``)."""
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs) + 1
        if self.layout is None and self.num_particles == 1:
            self.layout = REPEATED  # one particle: no particle plate at all, as Pyro's ELBOs at K = 1
        if self.layout is None:
            self.layout = particle_layout(model, guide, args, kwargs, self.max_plate_nesting - 1, self.num_particles)
        return self.max_plate_nesting - 1

    def _guide_trace(self, guide, args, kwargs, plates):
        if self.layout == REPEATED:
            rep_args, rep_kwargs = repeat_rows(args, kwargs, self.num_particles)
            trace = poutine.trace(guide).get_trace(*rep_args, **rep_kwargs)
            trace.repeated_particles = self.num_particles
        else:
            trace = poutine.trace(vectorize(guide, self.num_particles, plates)).get_trace(*args, **kwargs)
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
        plates = self._plates(model, guide, args, kwargs)
        return pair_traces(model, guide, args, kwargs, self.num_particles, plates, self.layout)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-scale * sum_b bound_b: the negative bound summed over the batch (times the
        subsampling factor); its gradient is the estimator's."""
        value, surrogate, scale = self.surrogate(model, guide, args, kwargs)
        if surrogate is not value:
            value = surrogate + (value - surrogate).detach()
        return -scale * value.sum()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss; back-propagates it when anything in it is trainable (as Pyro's ELBOs)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
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

    def surrogate(self, model, guide, args, kwargs):
        plates = self._plates(model, guide, args, kwargs)
        guide_trace = self._guide_trace(guide, args, kwargs, plates)
        buffers = {name: _weight_buffer(site)
                   for name, site in _latent_sites(guide_trace) if site["value"].requires_grad}
        model_trace, scaled = _replay(model, guide_trace, args, kwargs, self.num_particles, plates,
                                      lambda name, v: ScaleGrad.apply(v, buffers[name]) if name in buffers else v,
                                      self.layout)
        weights = importance_log_weights(model_trace, scaled, detach_guide_params=True)
        lw = weights.log_w
        w = torch.softmax(lw.detach(), 0)
        for name, buffer in buffers.items():
            buffer.copy_(_weights_like(w, buffer, guide_trace.nodes[name]["fn"].event_dim, weights))
        return _log_mean_exp(lw.detach()), (w * lw).sum(0), weights.scale


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


def _weight_buffer(site) -> torch.Tensor:
    """An empty tensor of a site's batch shape, ones for its event dims: DReG's weights per
    particle and data point, broadcast over the site's value."""
    value, event_dim = site["value"], site["fn"].event_dim
    return value.new_empty(value.shape[:value.dim() - event_dim] + (1,) * event_dim)


def _weights_like(w: torch.Tensor, buffer: torch.Tensor, event_dim: int, weights: ImportanceWeights) -> torch.Tensor:
    """(K, B) weights placed at the particle and data dims of ``buffer`` and broadcast to it
    (in the REPEATED layout the data dim holds the K * B rows, particle-major)."""
    if w.shape[0] == 1:  # one particle: its normalized weight is 1
        return w.new_ones(()).expand(buffer.shape)
    shape = [1] * buffer.dim()
    if weights.data_dim is not None and buffer.shape[weights.data_dim - event_dim] == w.numel() != w.shape[1]:
        shape[weights.data_dim - event_dim] = w.numel()
        return w.reshape(shape).expand(buffer.shape)
    shape[weights.particle_dim - event_dim] = w.shape[0]
    if weights.data_dim is not None:
        shape[weights.data_dim - event_dim] = w.shape[1]
    return w.reshape(shape).expand(buffer.shape)


class MIWAE(ImportanceWeightedELBO):
    """MIWAE_{M,K} = (1/M) sum_m log (1/K) sum_k w_mk (Rainforth et al. 2018): M independent
    IWAE_K bounds averaged; M*K particles, vectorized."""

    name = "miwae"

    def __init__(self, M: int = 1, K: int = 1, max_plate_nesting: float = float("inf")):
        self.M, self.K = check_positive_int("M", M), check_positive_int("K", K)
        super().__init__(M * K, max_plate_nesting)

    def bound(self, lw):
        return _log_mean_exp(lw.reshape(self.M, self.K, -1), 1).mean(0)

    def __repr__(self):
        return f"{type(self).__name__}(M={self.M}, K={self.K})"


class CIWAE(ImportanceWeightedELBO):
    """CIWAE_beta = beta ELBO_K + (1 - beta) IWAE_K on the same K particles (Rainforth et al.
    2018). ``beta`` here is the mixing weight, not the KL weight of ``--beta``."""

    name = "ciwae"

    def __init__(self, beta: float = 0.5, K: int = 1, max_plate_nesting: float = float("inf")):
        if not 0.0 <= float(beta) <= 1.0:
            raise ConfigError(f"ciwae's beta mixes ELBO and IWAE and must lie in [0, 1], got {beta}")
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

    def surrogate(self, model, guide, args, kwargs):
        plates = self._plates(model, guide, args, kwargs)
        guide_trace = self._guide_trace(guide, args, kwargs, plates)
        model_trace, _ = _replay(model, guide_trace, args, kwargs, self.num_particles, plates, lambda name, v: v,
                                 self.layout)
        weights = importance_log_weights(model_trace, guide_trace)
        stopped_trace, stopped = _replay(model, guide_trace, args, kwargs, self.num_particles, plates,
                                         lambda name, v: v.detach(), self.layout)
        lw_theta = importance_log_weights(stopped_trace, stopped, detach_guide_params=True).log_w
        iwae = _log_mean_exp(lw_theta)
        return iwae, self.bound(weights.log_w) + iwae - self.bound(lw_theta), weights.scale


class Renyi(ImportanceWeightedELBO):
    """Renyi (variational Renyi) bound of Li & Turner (2016), per data point:
    L_alpha = 1/(1 - alpha) log (1/K) sum_k w_k^(1 - alpha); alpha = 0 is IWAE_K, alpha -> 1 the
    ELBO (alpha = 1 is taken as the ELBO). Reparameterized gradient.

    Implemented on the log weights rather than wrapping Pyro's RenyiELBO, which has no
    ``differentiable_loss`` and takes one logsumexp over the log weight summed over the whole
    batch; for a batch of one point and no scaling the two agree (tested).
    """

    name = "renyi"

    def __init__(self, alpha: float = 0.0, K: int = 1, max_plate_nesting: float = float("inf")):
        self.alpha = float(alpha)
        if not math.isfinite(self.alpha):
            raise ConfigError(f"renyi's alpha must be a finite number (0: IWAE, 1: the ELBO), got {alpha}")
        super().__init__(K, max_plate_nesting)

    def bound(self, lw):
        if self.alpha == 1.0:
            return lw.mean(0)
        return _log_mean_exp((1.0 - self.alpha) * lw) / (1.0 - self.alpha)

    def __repr__(self):
        return f"{type(self).__name__}(alpha={self.alpha}, K={self.num_particles})"
