"""The linear-Gaussian model has an exact log p(x): estimates must agree with it."""

import pyro
import pytest
import torch

from pyro_vae.evaluation import evaluate
from pyro_vae.guides import GaussianGuide, LinearPosteriorGuide
from pyro_vae.models import LinearGaussian
from pyro_vae.objectives import Objective, log_weights, make_estimator


@pytest.fixture
def linear():
    torch.manual_seed(1)
    model = LinearGaussian(x_dim=8, z_dim=3, noise_scale=0.7)
    x = model.marginal().sample((64,)).detach()
    return model, x


def test_exact_posterior_makes_every_weight_equal_log_px(linear):
    model, x = linear
    lw = log_weights(model, LinearPosteriorGuide(model), x, 50)
    exact = model.log_marginal(x)
    assert torch.allclose(lw, exact.expand_as(lw), atol=1e-4)


def test_importance_sampled_log_likelihood_k5000_matches_closed_form(linear):
    model, x = linear
    exact = float(model.log_marginal(x).mean().detach())
    r = evaluate(model, LinearPosteriorGuide(model), x, k=5000)
    assert r["test_log_likelihood"] == pytest.approx(exact, abs=1e-3)
    assert r["test_elbo"] == pytest.approx(exact, abs=1e-3)


def test_trained_guide_gives_log_likelihood_near_exact_and_elbo_below(linear):
    model, x = linear
    for p in model.parameters():
        p.requires_grad_(False)
    guide = GaussianGuide(x_dim=8, z_dim=3, hidden=[32], activation="tanh")
    objective = Objective(model, guide, make_estimator("elbo", particles=8))
    opt = torch.optim.Adam(guide.parameters(), lr=1e-2)
    for _ in range(1500):
        loss = objective(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    exact = float(model.log_marginal(x).mean().detach())
    pyro.set_rng_seed(0)
    r = evaluate(model, guide, x, k=5000)
    assert r["test_elbo"] < exact  # a diagonal guide cannot match the correlated posterior
    assert r["test_elbo"] <= r["test_log_likelihood"] <= exact + 0.01
    assert r["test_log_likelihood"] == pytest.approx(exact, abs=0.05)


@pytest.mark.parametrize("estimator", ["elbo", "meanfield"])
def test_elbo_never_exceeds_log_px(linear, estimator):
    model, x = linear
    guide = GaussianGuide(x_dim=8, z_dim=3, hidden=[16])
    exact = model.log_marginal(x).sum().detach()
    for seed in range(5):
        pyro.set_rng_seed(seed)
        elbo = -make_estimator(estimator, particles=200).differentiable_loss(model, guide, x)
        assert float(elbo.detach()) < float(exact)
