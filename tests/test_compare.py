"""Gradient signal-to-noise (Rainforth et al. 2018), active units, and `pyro-vae compare`."""

from __future__ import annotations

import csv

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

from pyro_vae.cli import main
from pyro_vae.compare import compare, gradient_snr, snr_against_k
from pyro_vae.config import TrainConfig
from pyro_vae.data import Dataset
from pyro_vae.evaluation import active_units
from pyro_vae.guides.gaussian import GaussianGuide
from pyro_vae.models.vae import LinearGaussian
from pyro_vae.objectives import Objective, make_estimator


@pytest.fixture(scope="module")
def fitted_linear():
    """A linear model and Gaussian guide fitted for 300 ELBO steps to linear-Gaussian data."""
    pyro.set_rng_seed(0)
    data = LinearGaussian(10, 3, noise_scale=0.5).sample(500, mean=False).detach()
    model, guide = LinearGaussian(10, 3), GaussianGuide(10, 3, hidden=[16])
    objective = Objective(model, guide, make_estimator("elbo"))
    opt = torch.optim.Adam(objective.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        objective(data).backward()
        opt.step()
    return model, guide, data[:20]


def test_snr_directions_of_rainforth_et_al(fitted_linear):
    """IWAE: the guide's SNR falls as K grows, the model's rises; DReG's guide SNR does not fall."""
    rows = snr_against_k(*fitted_linear, ks=(1, 10, 100), repeats=100)
    snr = {(r["estimator"], r["K"]): r for r in rows}
    iwae_guide = [snr["iwae", k]["guide_snr"] for k in (1, 10, 100)]
    iwae_model = [snr["iwae", k]["model_snr"] for k in (1, 10, 100)]
    dreg_guide = [snr["dreg", k]["guide_snr"] for k in (1, 10, 100)]
    assert iwae_guide[0] > iwae_guide[1] > iwae_guide[2], iwae_guide
    assert iwae_model[0] < iwae_model[1] < iwae_model[2], iwae_model
    assert dreg_guide[2] >= dreg_guide[0], dreg_guide
    assert dreg_guide[2] > 5 * iwae_guide[2]


def test_gradient_snr_summary(fitted_linear):
    model, guide, x = fitted_linear
    r = gradient_snr(model, guide, "iwae:K=5", x, repeats=20)
    n_model = sum(p.numel() for p in model.parameters())
    assert r["repeats"] == 20 and len(r["model_per_parameter"]) == n_model
    assert r["model_snr"] == pytest.approx(float(r["model_per_parameter"].double().mean()), rel=1e-5)
    assert r["guide_snr"] > 0 and r["guide_snr_median"] > 0


class FixedGuide(PyroModule):
    """q(z|x) with mean (x_0, 0.05 x_0, 0): unit 0 active, unit 1 below 0.01, unit 2 dead."""

    def posterior_mean(self, x):
        return torch.stack([x[:, 0], 0.05 * x[:, 0], torch.zeros_like(x[:, 0])], -1)

    def forward(self, x, **context):
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", dist.Normal(self.posterior_mean(x), 0.3).to_event(1))


class FixedGuideWithPosterior(FixedGuide):
    def posterior(self, x):
        return dist.Normal(self.posterior_mean(x), 0.3).to_event(1)


@pytest.mark.parametrize("cls", [FixedGuide, FixedGuideWithPosterior])
def test_active_units_counts_units_by_covariance_of_the_mean(cls):
    torch.manual_seed(0)
    x = torch.randn(2000, 4)
    assert active_units(cls(), x)[0] == 1
    assert active_units(cls(), 0.05 * x)[0] == 0  # Var(unit 0) = 0.0025
    assert active_units(cls(), 3 * x)[0] == 2  # 0.05^2 * 9 = 0.0225 > 0.01


def _toy_dataset(n=240, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(4, d, generator=g)
    x = torch.bernoulli(probs[torch.randint(0, 4, (n,), generator=g)], generator=g)
    return Dataset("toy", train=x[:200], test=x[200:])


def test_compare_writes_table_csv_and_figures(tmp_path):
    config = TrainConfig(dataset="toy", z_dim=2, hidden=[8], epochs=2, batch_size=50, lr=1e-2,
                         device="cpu")
    specs = ["elbo", "iwae:K=4", "dreg:K=4"]
    rows = compare(config, specs, tmp_path, k=20, snr_repeats=5, snr_ks=(1, 4), snr_batch=20,
                   dataset=_toy_dataset())
    assert [r["estimator"] for r in rows] == specs
    with open(tmp_path / "compare.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["estimator"] for r in table] == specs
    for r in rows:
        assert np.isfinite(r["test_log_likelihood"]) and r["test_log_likelihood"] < 0
        assert r["kl"] >= 0 and 0 <= r["active_units"] <= 2 and r["seconds_per_epoch"] > 0
        # importance sampling with k=20 is at least as tight as a one-sample bound on average
        assert r["test_log_likelihood"] > r["test_bound"] - 0.5
    text = (tmp_path / "compare.md").read_text()
    assert "| iwae:K=4 |" in text and "Gradient SNR against K" in text
    for name in ("compare_bounds.png", "compare_snr.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000
    assert (tmp_path / "runs" / "iwae_K=4" / "checkpoint.pt").exists()


def test_cli_compare(tmp_path, capsys):
    data = _toy_dataset().train.numpy()
    np.save(tmp_path / "toy.npy", np.concatenate([data, data[:40]]))
    out = tmp_path / "cmp"
    code = main(["compare", "--estimators", "elbo", "stl:K=2", "--dataset", str(tmp_path / "toy.npy"),
                 "--z-dim", "2", "--hidden", "8", "--epochs", "1", "--k", "10", "--snr-repeats", "4",
                 "--snr-k", "1", "2", "--device", "cpu", "--quiet", "--out", str(out)])
    assert code == 0
    assert "stl:K=2" in capsys.readouterr().out
    assert (out / "compare.md").exists() and (out / "compare.csv").exists()


def test_cli_compare_unknown_estimator_is_a_clear_error(tmp_path, capsys):
    code = main(["compare", "--estimators", "elbo", "iwea", "--out", str(tmp_path), "--dataset", "x.npy"])
    assert code == 2
    assert "unknown estimator 'iwea'" in capsys.readouterr().err
