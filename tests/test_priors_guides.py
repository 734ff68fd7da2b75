"""VampPrior, mixture-of-Gaussians prior, IAF and low-rank guides, each trained briefly on MNIST."""

import pyro.distributions as dist
import pytest
import torch

from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.evaluation import evaluate
from pyro_vae.run import load_run
from pyro_vae.training import train


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("binarized-mnist", "cpu", train_size=2000, test_size=200)


def _train(tmp_path, mnist, **kw):
    config = TrainConfig.from_dict(dict(z_dim=10, hidden=[200], epochs=2, seed=0, device="cpu", **kw))
    rows = train(config, tmp_path / "run", quiet=True, dataset=mnist)
    _, model, guide = load_run(tmp_path / "run")
    torch.manual_seed(0)
    return rows, model, guide, evaluate(model, guide, mnist.test, k=20)


def test_vamp_prior_is_the_mixture_of_posteriors_at_learned_pseudo_inputs(tmp_path, mnist):
    rows, model, guide, r = _train(tmp_path, mnist, model="vamp", model_options={"prior_components": 50})
    z = torch.randn(7, 10)
    q = guide.posterior(model.pseudo_inputs)
    expected = torch.logsumexp(q.log_prob(z[:, None, :]), -1) - torch.log(torch.tensor(50.0))
    assert torch.allclose(model.prior().log_prob(z), expected, atol=1e-4)
    assert r["test_log_likelihood"] >= r["test_elbo"] and r["test_log_likelihood"] > -250


def test_mixture_prior_learns_its_components(tmp_path, mnist):
    rows, model, _, r = _train(tmp_path, mnist, model="mog", model_options={"prior_components": 5})
    torch.manual_seed(0)
    untrained = torch.randn(5, 10)  # the initial means (same seed as construction)
    assert not torch.allclose(model.prior_loc, untrained)
    assert isinstance(model.prior(), dist.MixtureSameFamily) and r["test_log_likelihood"] > -250


def test_iaf_guide_density_is_exact_and_correlated(tmp_path, mnist):
    rows, model, guide, r = _train(tmp_path, mnist, guide="iaf")
    x = mnist.test[:50]
    q = guide.posterior(x)
    z = q.sample()
    # log q(z|x) by inverting the flow from scratch equals the density cached at sampling
    assert torch.allclose(guide.posterior(x).log_prob(z.clone()), q.log_prob(z), atol=1e-3)
    assert r["test_log_likelihood"] >= r["test_elbo"] and r["test_log_likelihood"] > -250


def test_lowrank_guide_has_off_diagonal_covariance(tmp_path, mnist):
    rows, model, guide, r = _train(tmp_path, mnist, guide="lowrank", guide_options={"rank": 2})
    q = guide.posterior(mnist.test[:5])
    low_rank = q.covariance_matrix - torch.diag_embed(q.cov_diag)  # F F^T: correlations, rank 2
    assert low_rank.abs().max() > 1e-4 and torch.linalg.matrix_rank(low_rank[0], atol=1e-7).item() == 2
    assert r["test_log_likelihood"] >= r["test_elbo"] and r["test_log_likelihood"] > -250
