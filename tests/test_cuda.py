"""The CUDA path: skipped cleanly where torch sees no GPU (as in CI)."""

import pytest
import torch

from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.evaluation import evaluate
from pyro_vae.objectives import Objective, make_estimator
from pyro_vae.run import load_run
from pyro_vae.training import train

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("estimator", ["elbo", "meanfield", "elbo:K=4", "iwae:K=4", "dreg:K=4"])
def test_training_on_cuda_keeps_everything_on_the_device(tmp_path, estimator):
    data = load_dataset("binarized-mnist", "cuda", train_size=2000, test_size=500)
    assert data.train.is_cuda
    config = TrainConfig.from_dict(dict(preset="iwae1", estimator=estimator, epochs=2, device="cuda"))
    rows = train(config, tmp_path, quiet=True, dataset=data)
    assert rows[1]["test_loss"] < rows[0]["test_loss"]
    _, model, guide = load_run(tmp_path, "cuda")
    assert all(p.is_cuda for p in model.parameters())
    r = evaluate(model, guide, data.test[:100], k=50)
    assert r["test_elbo"] <= r["test_log_likelihood"] < 0


def test_a_training_step_does_not_synchronise_with_the_host():
    """No .item()/bool() inside the step: CUDA raises under the 'error' sync debug mode."""
    import pyro

    from pyro_vae.guides import GaussianGuide
    from pyro_vae.models import VAE

    model, guide = VAE(z_dim=8).cuda(), GaussianGuide(z_dim=8).cuda()
    for name in ("elbo", "meanfield"):
        objective = Objective(model, guide, make_estimator(name, particles=2))
        optimizer = torch.optim.Adam(objective.parameters())
        x = torch.bernoulli(torch.rand(64, 784, device="cuda"))
        objective(x).backward()  # warm-up (lazy initialisation may sync once)
        optimizer.step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with pyro.validation_enabled(False):
                loss = objective(torch.bernoulli(x), 0.5)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_applications_run_on_cuda(tmp_path):
    from pyro_vae.applications import anomaly_run, impute_run, interpolate, represent_run, traverse

    config = TrainConfig.from_dict(dict(preset="iwae1", classes=list(range(9)), epochs=1, train_size=2000,
                                        test_size=300, device="cuda"))
    train(config, tmp_path, quiet=True)
    assert 0 <= anomaly_run(tmp_path, k=10, device="cuda")["auroc_other_classes"] <= 1
    assert 0 < impute_run(tmp_path, n=20, steps=20, burn_in=5, device="cuda")["acceptance"] <= 1
    assert len(represent_run(tmp_path, labels=[20], device="cuda")["rows"]) == 1
    _, model, guide = load_run(tmp_path, "cuda")
    x = load_dataset("binarized-mnist", "cuda", train_size=1, test_size=4).test
    assert interpolate(model, guide, x[:2], x[2:], steps=3).is_cuda
    assert traverse(model, guide, x[:1], dims=[0, 1], steps=3).is_cuda
