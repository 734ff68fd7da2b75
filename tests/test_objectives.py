"""Importance-weighted estimators on the linear-Gaussian model, where log p(x) and p(z|x) are exact."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO
from pyro.nn import PyroModule
from torch import nn

from pyro_vae.guides.gaussian import GaussianGuide
from pyro_vae.models.vae import LinearGaussian
from pyro_vae.objectives import ESTIMATORS, Objective, make_estimator, scale_latents
from pyro_vae.objectives.importance import NotReparameterizedError

IW_NAMES = ["iwae", "stl", "dreg", "miwae", "ciwae", "piwae", "renyi", "enum"]


class ExactPosteriorGuide(PyroModule):
    """q(z|x) = N(A x + c, L L^T), initialised to the linear model's exact posterior p(z|x)."""

    latent_sites = ("z",)

    def __init__(self, model: LinearGaussian):
        super().__init__()
        with torch.no_grad():
            w, b, s2 = model.weight, model.bias, model.log_noise.exp() ** 2
            m_inv = torch.linalg.inv(w.T @ w + s2 * torch.eye(model.z_dim, dtype=w.dtype))
            a = m_inv @ w.T
        self.a = nn.Parameter(a.clone())
        self.c = nn.Parameter(-(a @ b).clone())
        self.scale_tril = nn.Parameter(torch.linalg.cholesky(s2 * m_inv).clone())

    def forward(self, x, **context):
        with pyro.plate("data", x.shape[0]):
            s = self.scale_tril
            tril = torch.tril(s, -1) + torch.diag_embed(s.diagonal().abs())
            return pyro.sample("z", dist.MultivariateNormal(x @ self.a.T + self.c, scale_tril=tril))


def linear_pair(x_dim=4, z_dim=2, hidden=(8,), seed=0, dtype=torch.float32):
    pyro.set_rng_seed(seed)
    model = LinearGaussian(x_dim, z_dim, noise_scale=0.5).to(dtype)
    guide = GaussianGuide(x_dim, z_dim, hidden=list(hidden)).to(dtype)
    return model, guide


def grads(module, loss):
    module_params = list(module.parameters())
    g = torch.autograd.grad(loss, module_params, allow_unused=True, retain_graph=True)
    return torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten() for gi, p in zip(g, module_params)])


def repeated_guide_grads(model, guide, spec, x, repeats):
    est = make_estimator(spec)
    return torch.stack([grads(guide, est.differentiable_loss(model, guide, x)) for _ in range(repeats)])


# -- the registry ------------------------------------------------------------------------------

def test_registry_names_and_options():
    for name in IW_NAMES:
        assert name in ESTIMATORS
    assert make_estimator("miwae:M=2,K=3").num_particles == 6
    assert make_estimator("iwae", particles=7).num_particles == 7
    assert make_estimator("iwae:K=5", particles=7).num_particles == 5  # the spec wins
    with pytest.raises(ValueError, match="positive integer"):
        make_estimator("iwae:K=0")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_estimator("ciwae:beta=2")
    with pytest.raises(ValueError, match="bad options"):
        make_estimator("dreg:M=3")


# -- values: a hand computation on a tiny model with a fixed seed -----------------------------

def _normal_lp(v, loc, scale):
    return -0.5 * math.log(2 * math.pi) - torch.log(scale) - 0.5 * ((v - loc) / scale) ** 2


def _lme(t, dim=0):
    return torch.logsumexp(t, dim) - math.log(t.shape[dim])


HAND = {  # spec -> (particles, bound from the (K, B) log weights), written out from the papers
    "elbo:K=6": (6, lambda lw: lw.mean(0)),
    "iwae:K=6": (6, lambda lw: _lme(lw)),
    "stl:K=6": (6, lambda lw: _lme(lw)),
    "dreg:K=6": (6, lambda lw: _lme(lw)),
    "miwae:M=2,K=3": (6, lambda lw: _lme(lw.reshape(2, 3, -1), 1).mean(0)),
    "ciwae:beta=0.25,K=6": (6, lambda lw: 0.25 * lw.mean(0) + 0.75 * _lme(lw)),
    "piwae:M=2,K=3": (6, lambda lw: _lme(lw)),  # the reported value is IWAE_{M*K}
    "renyi:alpha=0.5,K=6": (6, lambda lw: _lme(0.5 * lw) / 0.5),
    "renyi:alpha=1,K=6": (6, lambda lw: lw.mean(0)),
}


@pytest.mark.parametrize("spec", sorted(HAND))
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_loss_matches_hand_computation(spec, beta):
    model, guide = linear_pair(x_dim=2, z_dim=1, hidden=(3,), dtype=torch.float64)
    x = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.7, 0.1]], dtype=torch.float64)
    k, bound = HAND[spec]
    pyro.set_rng_seed(123)
    loss = make_estimator(spec).loss(scale_latents(model, beta), scale_latents(guide, beta), x)

    # by hand: z_k = loc + scale * eps_k with eps from the same seed; beta multiplies log p(z) - log q(z|x)
    with torch.no_grad():
        loc, scale = guide.encoder(x)
        pyro.set_rng_seed(123)
        z = loc + scale * torch.randn(k, *loc.shape, dtype=x.dtype)
        mean = z @ model.weight.T + model.bias
        log_lik = _normal_lp(x, mean, model.log_noise.exp()).sum(-1)
        log_prior = _normal_lp(z, torch.zeros(()), torch.ones(())).sum(-1)
        log_q = _normal_lp(z, loc, scale).sum(-1)
        lw = log_lik + beta * (log_prior - log_q)
        expected = -float(bound(lw).sum())
    assert loss == pytest.approx(expected, rel=1e-6)  # the prior is float32


def test_renyi_agrees_with_pyro_for_one_data_point():
    """Pyro's RenyiELBO takes one logsumexp over the whole batch: equal to ours for B = 1."""
    model, guide = linear_pair(x_dim=3, z_dim=2)
    x = torch.randn(1, 3)
    for alpha in (0.0, 0.5):
        pyro.set_rng_seed(5)
        ours = make_estimator(f"renyi:alpha={alpha},K=7").loss(model, guide, x)
        pyro.set_rng_seed(5)
        theirs = RenyiELBO(alpha=alpha, num_particles=7, vectorize_particles=True, max_plate_nesting=1).loss(model, guide, x)
        assert ours == pytest.approx(theirs, rel=1e-5)


# -- bounds against the exact log p(x) --------------------------------------------------------

def test_bounds_are_ordered_and_approach_log_marginal():
    """ELBO <= IWAE_5 <= IWAE_50 <= IWAE_500 <= log p(x) (Burda et al. 2016, Theorem 1)."""
    model, guide = linear_pair(x_dim=6, z_dim=3, hidden=(16,))
    x = model.sample(50, mean=False)
    repeats = 40
    xr = x.repeat(repeats, 1)  # independent estimates of each point's bound
    pyro.set_rng_seed(1)
    with torch.no_grad():
        log_px = float(model.log_marginal(x).mean())
        b = {spec: -make_estimator(spec).loss(model, guide, xr) / len(xr)
             for spec in ("elbo:K=1", "iwae:K=5", "iwae:K=50", "iwae:K=500")}
    values = [b["elbo:K=1"], b["iwae:K=5"], b["iwae:K=50"], b["iwae:K=500"], log_px]
    gaps = [hi - lo for lo, hi in zip(values, values[1:])]
    assert all(g > 0.05 for g in gaps[:-1]), values  # each step up is clearly positive
    assert gaps[-1] > 0, values
    assert log_px - b["iwae:K=500"] < 0.25 * (log_px - b["elbo:K=1"]), values


# -- gradients: expectations and variances -----------------------------------------------------

def _same_expectation(a, b, z_max=4.5):
    """Per coordinate, the difference of means over its standard error stays below z_max."""
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt().clamp_min(1e-12)
    z = ((a.mean(0) - b.mean(0)) / se).abs()
    return float(z.max()), float((z**2).mean())


def near_posterior_pair(noise=0.2, seed=0):
    """The linear model and its exact-posterior guide, perturbed: a guide near convergence."""
    pyro.set_rng_seed(seed)
    model = LinearGaussian(4, 2, noise_scale=0.5)
    guide = ExactPosteriorGuide(model)
    with torch.no_grad():
        for p in (guide.a, guide.c):
            p.add_(noise * torch.randn_like(p))
        guide.scale_tril.mul_(1.0 + noise)
    return model, guide


def test_dreg_guide_gradient_is_unbiased_for_iwae_with_less_variance():
    """Tucker et al. 2019: same expectation as the IWAE guide gradient, far smaller variance
    near convergence (here: a perturbed exact posterior)."""
    model, guide = near_posterior_pair()
    x = model.sample(4, mean=False)
    pyro.set_rng_seed(2)
    g_iwae = repeated_guide_grads(model, guide, "iwae:K=10", x, 400)
    g_dreg = repeated_guide_grads(model, guide, "dreg:K=10", x, 400)
    z_max, z2 = _same_expectation(g_dreg, g_iwae)
    assert z_max < 4.5 and z2 < 2.0, (z_max, z2)
    assert g_dreg.var(0).sum() < 0.5 * g_iwae.var(0).sum()


def test_dreg_model_gradient_is_iwae_model_gradient():
    """The model's gradient is the ordinary IWAE one: equal for the same draws."""
    model, guide = linear_pair(x_dim=4, z_dim=2)
    x = model.sample(5, mean=False)
    for spec in ("dreg:K=8", "stl:K=8"):
        pyro.set_rng_seed(3)
        g_iwae = grads(model, make_estimator("iwae:K=8").differentiable_loss(model, guide, x))
        pyro.set_rng_seed(3)
        g_other = grads(model, make_estimator(spec).differentiable_loss(model, guide, x))
        torch.testing.assert_close(g_other, g_iwae)


def test_piwae_splits_model_and_guide_gradients():
    """PIWAE: the model's gradient is IWAE_{MK}'s, the guide's MIWAE_{M,K}'s, for the same draws."""
    model, guide = linear_pair(x_dim=4, z_dim=2)
    x = model.sample(5, mean=False)

    def both(spec):
        pyro.set_rng_seed(4)
        loss = make_estimator(spec).differentiable_loss(model, guide, x)
        return grads(model, loss), grads(guide, loss), float(loss.detach())

    m_p, g_p, l_p = both("piwae:M=2,K=4")
    m_i, _, l_i = both("iwae:K=8")
    _, g_m, _ = both("miwae:M=2,K=4")
    torch.testing.assert_close(m_p, m_i)
    torch.testing.assert_close(g_p, g_m)
    assert l_p == pytest.approx(l_i)


def test_stl_with_one_particle_matches_elbo_in_expectation():
    model, guide = linear_pair(x_dim=4, z_dim=2, hidden=(6,))
    x = model.sample(4, mean=False)
    pyro.set_rng_seed(6)
    g_elbo = repeated_guide_grads(model, guide, "elbo:K=1", x, 400)
    g_stl = repeated_guide_grads(model, guide, "stl:K=1", x, 400)
    z_max, z2 = _same_expectation(g_stl, g_elbo)
    assert z_max < 4.5 and z2 < 2.0, (z_max, z2)


def test_path_gradients_vanish_at_the_exact_posterior():
    """With q = p(z|x), log w = log p(x) for every z: STL and DReG guide gradients are zero for
    every sample (Roeder et al. 2017; Tucker et al. 2019), the total gradient's are not."""
    pyro.set_rng_seed(7)
    model = LinearGaussian(4, 2, noise_scale=0.5).double()
    guide = ExactPosteriorGuide(model)
    x = model.marginal().sample((6,))
    log_px = float(model.log_marginal(x).sum())
    for spec in ("stl:K=1", "stl:K=5", "dreg:K=5", "dreg:K=1"):
        for _ in range(3):
            loss = make_estimator(spec).differentiable_loss(model, guide, x)
            assert float(loss) == pytest.approx(-log_px, rel=1e-7)  # the prior is float32
            assert grads(guide, loss).abs().max() < 1e-9, spec
    for spec in ("iwae:K=5", "elbo:K=1"):
        loss = make_estimator(spec).differentiable_loss(model, guide, x)
        assert grads(guide, loss).abs().max() > 1e-3, spec


# -- errors and the training objective -------------------------------------------------------

class CoinGuide(PyroModule):
    latent_sites = ("z", "c")

    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(2))

    def forward(self, x, **context):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(0.5))
            return pyro.sample("z", dist.Normal(self.loc, 1.0).to_event(1))


@pytest.mark.parametrize("name", ["stl", "dreg", "iwae"])
@pytest.mark.filterwarnings("ignore:Found non-auxiliary vars in guide but not model")  # the guide's extra site, on purpose
def test_non_reparameterizable_guide_site_is_a_clear_error(name):
    model, _ = linear_pair(x_dim=3, z_dim=2)
    with pytest.raises(NotReparameterizedError, match=r"guide site 'c'.*'elbo'.*'enum'"):
        make_estimator(f"{name}:K=2").loss(model, CoinGuide(), torch.randn(4, 3))


@pytest.mark.parametrize("spec", ["iwae:K=3", "stl:K=3", "dreg:K=3", "miwae:M=2,K=2",
                                  "ciwae:beta=0.5,K=3", "piwae:M=2,K=2", "renyi:alpha=0.5,K=3", "enum"])
def test_objective_steps_reduce_the_loss(spec):
    """Every estimator drives the one training objective (a torch optimizer, beta scaling)."""
    model, guide = linear_pair(x_dim=4, z_dim=2)
    x = LinearGaussian(4, 2).sample(64, mean=False)
    objective = Objective(model, guide, make_estimator(spec))
    opt = torch.optim.Adam(objective.parameters(), lr=0.05)
    pyro.set_rng_seed(8)
    first = float(objective(x))
    for _ in range(60):
        opt.zero_grad()
        objective(x, beta=0.9).backward()
        opt.step()
    assert float(objective(x)) < first - 1.0


@pytest.mark.parametrize("name", ["iwae", "stl", "dreg", "miwae", "ciwae", "piwae"])
@pytest.mark.filterwarnings("ignore:Encountered NaN")  # the subsample site's NaN must be ignored
def test_plate_subsample_sites_stay_out_of_the_log_weights(monkeypatch, name):
    """A plate records a subsample site whose log-density is 0: a CPU tensor even on CUDA, which
    broke every importance-weighted estimator there. The log-weights must not read it."""
    from pyro.poutine.subsample_messenger import _Subsample

    torch.manual_seed(0)
    model = LinearGaussian(x_dim=4, z_dim=2)
    x = torch.randn(8, 4)
    expected = Objective(model, ExactPosteriorGuide(model), make_estimator(name, 4))
    torch.manual_seed(1)
    value = float(expected(x))
    monkeypatch.setattr(_Subsample, "log_prob", lambda self, v: torch.full((3, 1, 1), math.nan))
    torch.manual_seed(1)
    assert float(expected(x)) == value
