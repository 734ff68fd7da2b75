"""Latent diagnostics of a guide: posterior means, active units (Burda et al. 2016) and the
mutual information I(x; z) (Hoffman & Johnson 2016; He et al. 2019)."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro import poutine

from pyro_vae.errors import ProgramError
from pyro_vae.evaluation.chunk import context_rows
from pyro_vae.evaluation.noise import BlockNoise
from pyro_vae.objectives.base import repeat_rows, vectorize
from pyro_vae.sites import is_latent


@torch.no_grad()
def posterior_means(guide, x, num_samples: int = 64, seed: int = 0, chunk: int = 1000, **context) -> dict:
    """E_q[z_s | x] per latent site s of the guide, each (N, dims).

    Uses the mean of each site's distribution, averaged over ``num_samples`` draws of the sites
    it depends on (exact for a single-site Gaussian guide, Monte Carlo for layered ones), or,
    where the distribution has no closed-form mean (a flow such as ``iaf``), the average of the
    ``num_samples`` draws themselves.
    """
    out: dict[str, list] = {}
    repeated = False
    for i in range(0, len(x), chunk):
        xb, rows = x[i:i + chunk], context_rows(context, i, i + chunk)
        if not repeated:
            try:
                with BlockNoise(seed, range(i, i + len(xb))):
                    tr = poutine.trace(vectorize(guide, num_samples)).get_trace(xb, **rows)
            except (RuntimeError, ValueError, IndexError):  # a guide that does not broadcast
                repeated = True
        if repeated:  # the batch repeated once per draw (rows j * B + i), the same noise
            args, kwargs = repeat_rows((xb,), rows, num_samples)
            with BlockNoise(seed, range(i, i + len(xb)), repeats=num_samples):
                tr = poutine.trace(guide).get_trace(*args, **kwargs)
        for name, s in tr.nodes.items():
            if is_latent(s):
                try:
                    m = s["fn"].mean.expand(s["value"].shape)
                except NotImplementedError:  # no closed form (a flow): average the draws
                    m = s["value"]
                m = m.reshape(num_samples, len(xb), -1) if repeated else m
                out.setdefault(name, []).append(m.mean(0).reshape(len(xb), -1))
    return {name: torch.cat(v) for name, v in out.items()}


def active_units_per_site(guide, x, threshold: float = 0.01, **context) -> dict:
    """{site: (count, variances)}: see ``active_units``."""
    result = {}
    for name, mean in posterior_means(guide, x, **context).items():
        var = mean.double().var(0).float()
        result[name] = (int((var > threshold).sum()), var)
    return result


def active_units(guide, x, threshold: float = 0.01, **context) -> tuple[int, torch.Tensor]:
    """Burda et al. 2016 (sec. 5.2): unit u is active when A_u = Var_x(E_{q(z|x)}[z_u]) > threshold.

    Returns (number of active units, A as a 1-D tensor over every latent unit, the guide's sites
    concatenated in sampling order). The variance is the sample variance over the rows of x.
    """
    per_site = active_units_per_site(guide, x, threshold, **context)
    return sum(c for c, _ in per_site.values()), torch.cat([v for _, v in per_site.values()])


@torch.no_grad()
def mutual_information(guide, x, seed: int = 0, chunk: int = 256, **context) -> float:
    """I(x; z) under q(x, z) = p_data(x) q(z|x), by the estimator of He et al. 2019 (`calc_mi`),
    which is the mutual-information term of Hoffman & Johnson's ELBO surgery (2016):

        I = E_x E_{q(z|x)} [log q(z|x) - log q(z)],  q(z) ~= (1/N) sum_n q(z|x_n),

    with one draw z_i ~ q(z|x_i) per point and the aggregate posterior q(z) approximated by the
    mixture over all N given points (so I <= log N). Needs ``guide.posterior(x)``; for a layered
    guide q(z1|x) q(z2|z1) that is q(z1|x), and I(x; z1, z2) = I(x; z1).
    """
    if not hasattr(guide, "posterior"):
        raise ProgramError(f"{type(guide).__name__} has no posterior(x); mutual information needs one")
    q = guide.posterior(x, **context)
    base = q
    while isinstance(base, dist.Independent):
        base = base.base_dist
    g = torch.Generator(device=x.device).manual_seed(seed)
    n = x.shape[0]
    if isinstance(base, dist.Normal):
        loc, scale = (t.double().expand(n, -1) for t in (base.loc, base.scale))
        z = loc + scale * torch.randn(loc.shape, generator=g, device=x.device, dtype=loc.dtype)
        prec = scale**-2
        const = -(scale.log().sum(-1) + 0.5 * (loc**2 * prec).sum(-1) + 0.5 * loc.shape[-1] * math.log(2 * math.pi))

        def rows(zi):  # log q(z_i | x_j) = -0.5 z_i^2 . prec_j + z_i . (loc_j prec_j) + const_j
            return -0.5 * (zi**2) @ prec.T + zi @ (loc * prec).T + const
    elif isinstance(q, dist.TransformedDistribution):
        raise ProgramError(f"mutual information needs log q(z_i | x_j) for every pair of points; the flow of "
                         f"{type(guide).__name__} gives it only by inverting its transforms N^2 times, so it "
                         f"is not computed for this guide")
    else:
        z = q.sample()

        def rows(zi):
            return q.log_prob(zi[:, None]).double()
    total = 0.0
    for i in range(0, n, chunk):  # (chunk, N) at a time: never the whole N x N matrix
        log_q = rows(z[i:i + chunk])
        own = log_q[torch.arange(len(log_q)), torch.arange(i, i + len(log_q))]
        total += float((own - torch.logsumexp(log_q, 1)).sum())
    return total / n + math.log(n)
