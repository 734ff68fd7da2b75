"""The beta-TCVAE objective (Chen et al. 2018, "Isolating sources of disentanglement in VAEs").

With the aggregate posterior q(z) = (1/N) sum_n q(z|x_n) and its marginals q(z_j), the KL term of
the ELBO, averaged over the data, splits into three (Chen et al., eq. 2)::

    E_x KL(q(z|x) || p(z)) = I_q(x; z)                       index-code mutual information
                           + KL(q(z) || prod_j q(z_j))       total correlation (TC)
                           + KL(prod_j q(z_j) || p(z))       dimension-wise KL

and the objective weights them by alpha, beta and gamma; per data point and particle, with
z ~ q(z|x) and s the latent sites' KL weight (``--beta``, warm-up and cycles scale all three)::

    log p(x|z) - s [alpha (log q(z|x) - log q(z)) + beta (log q(z) - sum_j log q(z_j))
                    + gamma (sum_j log q(z_j) - log p(z))]
    = ELBO term - s [(alpha - 1) MI + (beta - 1) TC + (gamma - 1) DWKL],

so with alpha = beta = gamma = 1 it *is* the ELBO, sample by sample, whatever q(z) is estimated as.

log q(z_i) and log q(z_ij) are estimated from the batch of B codes (i is the row whose z is
scored, n over the batch's rows) with weights W_in: ``log q(z_i) ~ logsumexp_n [log W_in + log
q(z_i | x_n)]``, and the same per dimension:

- ``mws``, minibatch-weighted sampling (Chen et al., sec. 4.1 and app. C.1): W_in = 1/(N B),
  the paper's normaliser. Where the rows' posteriors barely overlap, log q(z_i) comes out near
  log q(z_i|x_i) - log(N B), log B below the truth (about log q(z_i|x_i) - log N), and likewise
  per dimension, so the TC estimate sits up to (D - 1) log B above the TC: an offset in the loss's
  value (up to (beta - 1)(D - 1) log B nats per point), not in its gradient.
- ``mss``, minibatch-stratified sampling (app. C.2): W_ii = 1/N for the row's own posterior and
  (N - 1)/(N (B - 1)) for each other row, an unbiased estimate of q(z_i) (exact when the batch is
  the whole data set).

N, the data set's size, comes from the option ``N=``, else from the data plate when the program
subsamples it (``pyro.plate("data", N, subsample_size=B)``), else from the training loop, which
tells the estimator the training set's size (``tell_dataset_size``); otherwise it refuses.

What the estimator needs, checked from the traces: every latent site inside the data plate (a
code per data point), reparameterized, unmasked, and each guide site factorizing over its
dimensions (an ``Independent`` of a scalar distribution, such as ``Normal(...).to_event(1)``, or a
scalar site), so that q(z_j) = (1/N) sum_n q(z_j|x_n); with several latent sites, none of the
guide's distributions may depend on another site's draw. The prior needs no factorization: the
gamma term is then KL(prod_j q(z_j) || p(z)).
"""

from __future__ import annotations

import math

import torch
from pyro import poutine

from pyro_vae.errors import ConfigError, ProgramError
from pyro_vae.objectives.base import (
    _divide,
    _reduce,
    find_data_plate,
    importance_log_weights,
    site_log_prob,
)
from pyro_vae.objectives.importance import ImportanceWeightedELBO, _latent_sites
from pyro_vae.objectives.kl import _name, _unexpand, factors

SAMPLINGS = ("mws", "mss")


class NotFactorizedError(ProgramError):
    """A program whose guide (or latent layout) beta-TCVAE's q(z) estimate cannot handle."""


def log_importance_matrix(batch_size: int, dataset_size: int, sampling: str = "mws", device=None) -> torch.Tensor:
    """log W (B, B): the weight of row n's posterior in the estimate of q(z_i) (module docstring)."""
    b, n = batch_size, float(dataset_size)
    if sampling == "mws":
        return torch.full((b, b), -math.log(n * b), device=device)
    other = math.log((n - 1) / (n * (b - 1))) if b > 1 else 0.0
    w = torch.full((b, b), other, device=device)
    w.diagonal().fill_(-math.log(n))
    return w


def aggregate_log_q(pairs: torch.Tensor, dataset_size: int, sampling: str = "mws") -> tuple[torch.Tensor, torch.Tensor]:
    """(log q(z_i), log q(z_ij)) from ``pairs`` (K, B, B, D) = log q(z_ij | x_n) at [k, i, n, j]:
    (K, B) and (K, B, D)."""
    w = log_importance_matrix(pairs.shape[1], dataset_size, sampling, pairs.device).to(pairs.dtype)
    log_qz = torch.logsumexp(w + pairs.sum(-1), dim=2)
    log_qz_dims = torch.logsumexp(w[..., None] + pairs, dim=2)
    return log_qz, log_qz_dims


def pairwise_log_q(guide_trace, data_dim: int) -> torch.Tensor:
    """log q(z_ij | x_n) for every particle k, row i, row n and latent dimension j: (K, B, B, D),
    the dimensions of every latent site side by side (each site's inner plates and event dims
    flattened). Evaluates each guide site's factor distribution, whose parameters belong to row
    n, at row i's value by broadcasting: no program is run again."""
    repeats = getattr(guide_trace, "repeated_particles", None)
    columns = []
    for name, site in _latent_sites(guide_trace):
        fn, z = site["fn"], site["value"]
        f = fn if fn.event_dim == 0 else factors(fn)
        if f is None or site["mask"] is not None:
            why = "is masked" if f is not None else f"is {_name(fn)}, which does not factorize over its dimensions"
            raise NotFactorizedError(
                f"beta-tcvae needs a guide that factorizes over latent dimensions, q(z|x) = prod_j q(z_j|x) "
                f"(e.g. Normal(loc, scale).to_event(1)), to estimate the marginals q(z_j); guide site {name!r} "
                f"{why}. Use a diagonal guide (--guide gaussian) or another estimator")
        p = z.dim() - fn.event_dim + data_dim  # the data position in the value's dims
        lp = _unexpand(f).log_prob(z.movedim(p, 0).unsqueeze(p + 1)).movedim(0, p)  # [.., i, n, ..]
        lead = lp.shape[:p]
        if len(lead) > 1:
            raise NotFactorizedError(f"beta-tcvae: latent site {name!r} sits in plates outside the data plate; "
                                     f"it needs one code per data point")
        lp = lp.reshape(*(lead or (1,)), lp.shape[p], lp.shape[p + 1], -1)
        if repeats and repeats > 1:  # rows j * B + i: keep the pairs within each particle
            k, kb = repeats, lp.shape[1]
            lp = lp.reshape(k, kb // k, k, kb // k, -1).diagonal(dim1=0, dim2=2).movedim(-1, 0)
        columns.append(lp)
    return torch.cat(columns, dim=-1)


class BetaTCVAE(ImportanceWeightedELBO):
    """The beta-TCVAE objective (module docstring); ``differentiable_loss`` is minus its sum over
    the batch (times the subsampling factor), its gradient the reparameterized one.

    :param beta: weight of the total correlation (Chen et al.'s beta; 1 gives the ELBO).
    :param alpha, gamma: weights of the mutual information and the dimension-wise KL (1, 1).
    :param sampling: ``mws`` (minibatch-weighted, the default) or ``mss`` (minibatch-stratified).
    :param N: the data set's size (see the module docstring for where it comes from otherwise).
    :param K: particles per data point, each with its own estimate of q(z) from the batch.
    """

    name = "beta-tcvae"

    def __init__(self, beta: float = 1.0, alpha: float = 1.0, gamma: float = 1.0, sampling: str = "mws",
                 N: int | None = None, K: int = 1, max_plate_nesting: float = float("inf")):
        if sampling not in SAMPLINGS:
            raise ConfigError(f"beta-tcvae's sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
        if N is not None and (not isinstance(N, int) or N < 1):
            raise ConfigError(f"beta-tcvae's N is the data set's size, a positive integer; got {N!r}")
        self.beta, self.alpha, self.gamma = float(beta), float(alpha), float(gamma)
        self.sampling, self.N = sampling, N
        self.train_size = None  # the training set's size, told by the training loop
        self._independence_checked = False
        super().__init__(K, max_plate_nesting)

    def dataset_size(self, model_trace) -> int:
        if self.N:
            return self.N
        plate = find_data_plate(model_trace)
        if plate is not None and plate.full_size is not None and plate.full_size != plate.size:
            return plate.full_size
        if self.train_size:
            return self.train_size
        raise ConfigError("beta-tcvae needs the data set's size N to estimate q(z): give it as an option "
                         "(beta-tcvae:beta=6,N=737280), or subsample the data plate, "
                         "pyro.plate('data', N, subsample_size=B); pyro-vae train passes it itself")

    def surrogate(self, model, guide, args, kwargs):
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        self._check_reparameterized(guide_trace)
        weights = importance_log_weights(model_trace, guide_trace)
        if weights.data_dim is None:
            raise NotFactorizedError("beta-tcvae estimates q(z) from the codes of the batch's data points, so every "
                                     "latent site must sit inside the data plate (no global latents)")
        if not self._independence_checked:
            check_sites_independent(guide, args, kwargs)
            self._independence_checked = True
        elbo = weights.log_w  # (K, B): log p(x|z) + s (log p(z) - log q(z|x))
        if (self.alpha, self.beta, self.gamma) == (1.0, 1.0, 1.0):
            return elbo.mean(0), elbo.mean(0), weights.scale
        pairs = pairwise_log_q(guide_trace, weights.data_dim)
        log_qz, log_qz_dims = aggregate_log_q(pairs, self.dataset_size(model_trace), self.sampling)
        log_qz_x = pairs.diagonal(dim1=1, dim2=2).sum(1)  # (K, B): log q(z_i | x_i)
        sites = [s for _, s in _latent_sites(guide_trace)]
        s = _divide(sites[0]["scale"], weights.scale)  # the KL weight (sites are scaled alike)
        penalty = (self.alpha - 1) * (log_qz_x - log_qz) + (self.beta - 1) * (log_qz - log_qz_dims.sum(-1))
        if self.gamma != 1.0:
            rows = (1, elbo.numel()) if getattr(model_trace, "repeated_particles", None) else elbo.shape
            log_pz = sum(_reduce(site_log_prob(model_trace.nodes[name], scale=1.0), weights.particle_dim,
                                 weights.data_dim, rows).reshape(elbo.shape) for name, _ in sites)
            penalty = penalty + (self.gamma - 1) * (log_qz_dims.sum(-1) - log_pz)
        value = (elbo - s * penalty).mean(0)
        return value, value, weights.scale

    def __repr__(self):
        return (f"{type(self).__name__}(beta={self.beta}, alpha={self.alpha}, gamma={self.gamma}, "
                f"sampling={self.sampling!r}, K={self.num_particles})")


def check_sites_independent(guide, args, kwargs) -> None:
    """With several latent sites, each guide site's log-density must not change when the earlier
    sites' draws do (q(z|x) = prod_s q(z_s|x)); refuse otherwise (e.g. hvae2's q(z2 | z1)). Runs
    the guide three times on a forked RNG: training draws what it would have."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.no_grad(), poutine.block(), torch.random.fork_rng(devices=devices):
        first = poutine.trace(guide).get_trace(*args, **kwargs)
        names = [name for name, _ in _latent_sites(first)]
        if len(names) < 2:
            return
        other = poutine.trace(guide).get_trace(*args, **kwargs)
        data = {name: other.nodes[name]["value"] for name in names[:-1]}
        moved = poutine.trace(poutine.condition(guide, data=data)).get_trace(*args, **kwargs)
    for name in names[1:]:
        value = first.nodes[name]["value"]
        if not torch.allclose(first.nodes[name]["fn"].log_prob(value), moved.nodes[name]["fn"].log_prob(value)):
            raise NotFactorizedError(
                f"beta-tcvae needs q(z|x) to factorize over latent dimensions, but the guide's site {name!r} "
                f"depends on the draw of an earlier site; use one latent site, or sites drawn independently given x")


def tell_dataset_size(estimator, n: int):
    """Tell an estimator that needs it (``BetaTCVAE``) the training set's size; returns it."""
    if hasattr(estimator, "train_size"):
        estimator.train_size = n
    return estimator


@torch.no_grad()
def total_correlation(model, guide, x: torch.Tensor, batch_size: int = 1000, seed: int = 0, **context) -> float:
    """KL(q(z) || prod_j q(z_j)) of the aggregate posterior over the rows of ``x`` (N = len(x)),
    in nats: the mean over rows of log q(z_i) - sum_j log q(z_ij), z_i ~ q(z|x_i), each
    estimated by minibatch-stratified sampling from batches of ``batch_size`` rows (exact in
    the estimate of q when one batch holds every row). Refuses guides beta-tcvae refuses."""
    estimator, total = BetaTCVAE(beta=2.0, sampling="mss", N=len(x)), 0.0
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i in range(0, len(x), batch_size):
            rows = {k: v[i : i + batch_size] for k, v in context.items()}
            model_trace, guide_trace = estimator._get_trace(model, guide, (x[i : i + batch_size],), rows)
            weights = importance_log_weights(model_trace, guide_trace)
            if weights.data_dim is None:
                raise NotFactorizedError("the total correlation needs every latent site inside the data plate")
            log_qz, log_qz_dims = aggregate_log_q(pairwise_log_q(guide_trace, weights.data_dim), len(x), "mss")
            total += float((log_qz - log_qz_dims.sum(-1)).sum())
    return total / len(x)
