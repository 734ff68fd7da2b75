"""Any data shape, honest units, and data checked against the distribution the model uses."""

import argparse
import json
import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae.checks import DataError, DataScaleWarning, check_data_scale, check_data_support
from pyro_vae.config import TrainConfig, build_model_and_guide
from pyro_vae.data import Standardization, load_dataset, load_points, load_run_data
from pyro_vae.evaluation import evaluate, evaluate_run
from pyro_vae.guides import GaussianGuide
from pyro_vae.models import VAE, LinearGaussian
from pyro_vae.run import load_run
from pyro_vae.training import train

SCALES = torch.tensor([50.0, 0.2, 3.0])


def points(path, n=200, scales=SCALES, seed=0):
    """n rows of 3 correlated features of very different scales, saved as .npy."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, generator=g)
    x = (z + 0.5 * torch.randn(n, len(scales), generator=g)) * scales + torch.arange(len(scales)) * 10
    np.save(path, x.numpy())
    return x


class BernoulliProgram(nn.Module):
    """A user's Bernoulli VAE written as a plain Pyro program (pyro.module, sites z and obs)."""

    def __init__(self, x_dim=3, z_dim=2, **_):
        super().__init__()
        self.x_dim, self.z_dim = x_dim, z_dim
        self.decoder = nn.Linear(z_dim, x_dim)

    def forward(self, x, **_):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


# ------------------------------------------------------------------------------- honest units


def test_standardized_linear_run_reports_log_px_in_the_data_units(tmp_path):
    """eval's log p(x) of a linear-Gaussian run on standardized data = the exact log p(x) of the
    de-standardized model: x = m + sd * x_std ~ N(m + sd b, D (W W^T + s^2 I) D), D = diag(sd)."""
    raw = points(tmp_path / "x.npy")
    config = TrainConfig(dataset=str(tmp_path / "x.npy"), model="linear", guide="linear-posterior", z_dim=1,
                         standardize=True, epochs=1, batch_size=50, lr=1e-2, device="cpu")
    train(config, tmp_path / "run", quiet=True)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    data = load_dataset(str(tmp_path / "x.npy"))  # the same split, raw units
    assert saved["standardize"] and saved["standardization"]["sd"] == pytest.approx(data.train.double().std(0, unbiased=False).tolist())
    assert saved["standardization"]["mean"] == pytest.approx(data.train.double().mean(0).tolist())

    r = evaluate_run(tmp_path / "run", k=20, device="cpu", export_points=(), figures=False)
    _, model, _ = load_run(tmp_path / "run")
    s = Standardization.fit(data.train)
    with torch.no_grad():
        m = model.marginal()
        sd, mean = s.sd.float(), s.mean.float()
        destandardized = dist.MultivariateNormal(mean + sd * m.loc, covariance_matrix=sd[:, None] * m.covariance_matrix * sd)
        exact = float(destandardized.log_prob(data.test).mean())
    jacobian = -float(torch.log(s.sd).sum())
    assert abs(jacobian) > 3  # log 50 + log 0.2 + log 3 = 3.40 nats: the units matter
    assert r["test_log_likelihood"] == pytest.approx(exact, abs=1e-4)
    assert r["test_elbo"] == pytest.approx(exact, abs=1e-4)  # the exact posterior: every weight is log p(x)
    assert r["log_jacobian"] == pytest.approx(jacobian, abs=1e-6)
    assert r["test_bits_per_dim"] is None and "continuous" in r["test_bits_per_dim_note"]
    assert load_run_data(load_run(tmp_path / "run")[0], "cpu").test == pytest.approx(s.apply(data.test))
    assert raw.shape == (200, 3)


def test_bits_per_dim_only_for_discrete_observations():
    torch.manual_seed(0)
    x_bin = torch.bernoulli(torch.full((20, 6), 0.3))
    bern = evaluate(VAE(6, 2, [8]), GaussianGuide(6, 2, [8]), x_bin, k=5, psis=False)
    assert bern["test_bits_per_dim"] == pytest.approx(bern["test_nll"] / (6 * math.log(2)))
    grey = evaluate(VAE(6, 2, [8]), GaussianGuide(6, 2, [8]), x_bin * 0.5 + 0.2, k=5, psis=False)
    assert grey["test_bits_per_dim"] == pytest.approx(grey["test_nll"] / (6 * math.log(2)))
    assert "soft targets" in grey["test_bits_per_dim_note"] and "test_bits_per_dim_note" not in bern
    for likelihood in ("gaussian", "laplace", "continuous-bernoulli"):
        r = evaluate(VAE(6, 2, [8], likelihood=likelihood), GaussianGuide(6, 2, [8]), x_bin * 0.5, k=5, psis=False)
        assert r["test_bits_per_dim"] is None and "continuous" in r["test_bits_per_dim_note"], likelihood
    grid = torch.randint(0, 256, (20, 6)) / 255.0
    r = evaluate(VAE(6, 2, [8], likelihood="discretized-logistic"), GaussianGuide(6, 2, [8]), grid, k=5, psis=False)
    assert r["test_bits_per_dim"] == pytest.approx(r["test_nll"] / (6 * math.log(2)))


def test_standardize_refused_with_a_bernoulli_family_likelihood():
    with pytest.raises(ValueError, match="--standardize .* bernoulli .* --likelihood gaussian"):
        TrainConfig(standardize=True)
    with pytest.raises(ValueError, match="discretized-logistic"):
        TrainConfig(standardize=True, likelihood="discretized-logistic")
    assert TrainConfig(standardize=True, likelihood="gaussian").standardize


def test_large_standardization_lives_in_a_tensor_file(tmp_path):
    x = torch.randn(40, 300) * 7 + 3
    np.save(tmp_path / "x.npy", x.numpy())
    config = TrainConfig(dataset=str(tmp_path / "x.npy"), likelihood="gaussian", standardize=True, z_dim=2,
                         hidden=[4], epochs=1, batch_size=20, device="cpu")
    train(config, tmp_path / "run", quiet=True)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["standardization"]
    assert saved == {"file": "standardization.pt", "features": 300}
    state = torch.load(tmp_path / "run" / saved["file"], weights_only=True)
    d = load_dataset(str(tmp_path / "x.npy"), standardize=True)
    assert torch.equal(state["sd"], d.standardization.sd) and torch.equal(state["mean"], d.standardization.mean)
    run_config = load_run(tmp_path / "run")[0]
    assert torch.equal(load_run_data(run_config, "cpu").test, d.test)  # refitted from the run's training rows
    assert torch.equal(load_run_data(run_config, "cpu", run_dir=tmp_path / "run").test, d.test)


# ------------------------------------------------------------------------------- data checks


def test_support_check_refuses_real_data_for_a_users_bernoulli_program():
    model = BernoulliProgram()
    x = torch.randn(500, 3)
    with pytest.raises(DataError, match=r"training data holds \d+ values outside the model's observed site 'obs' "
                                        r"\(Bernoulli, values in \{0, 1\}\).*range over \[-.*first in row 0\).*gaussian"):
        check_data_support(model, x, "training data")
    check_data_support(model, torch.bernoulli(torch.full((500, 3), 0.5)))  # binary data pass
    with pytest.raises(DataError, match="values outside"):  # grey levels are not {0, 1} for Pyro's Bernoulli
        check_data_support(model, torch.rand(500, 3))
    check_data_support(model, torch.rand(500, 3), binarized=True)  # ... unless each batch is a Bernoulli draw
    bad = torch.bernoulli(torch.full((500, 3), 0.5))
    bad[437, 1] = 2.0
    with pytest.raises(DataError, match=r"holds 1 values .*\[2, 2\]; first in row 437"):  # every row, not the traced ones
        check_data_support(model, bad)


def test_support_check_through_train_for_a_program_given_by_import_path(tmp_path):
    points(tmp_path / "x.npy", n=50)
    config = TrainConfig(dataset=str(tmp_path / "x.npy"), model="test_any_data:BernoulliProgram",
                         guide="gaussian", z_dim=2, hidden=[4], epochs=1, device="cpu")
    with pytest.raises(DataError, match=r"training data of .* holds 135 values outside the model's observed site 'obs' "
                                        r"\(Bernoulli, values in \{0, 1\}\)"):  # 45 rows x 3, none in {0, 1}
        train(config, tmp_path / "run", quiet=True)


def test_support_check_on_parameter_dependent_support_uses_the_traced_rows():
    def binomial(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Binomial(torch.tensor([3.0, 5.0]), probs=0.5).to_event(1), obs=x)

    check_data_support(binomial, torch.tensor([[3.0, 5.0], [0.0, 1.0], [9.0, 9.0]]))  # row 2 is not traced
    with pytest.raises(DataError, match="outside the support of the model's observed site 'obs' .*Binomial"):
        check_data_support(binomial, torch.tensor([[4.0, 5.0], [0.0, 1.0]]))


def test_scale_hint_for_a_gaussian_on_data_of_scale_50(tmp_path):
    x = torch.randn(300, 2) * 50
    gaussian = VAE(2, 2, [8], likelihood="gaussian")
    with pytest.warns(DataScaleWarning, match=r"feature scale ~[45]\d.*add --standardize"):
        message = check_data_scale(gaussian, x)
    assert "Normal observation" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_data_scale(gaussian, Standardization.fit(x).apply(x)) is None
        assert check_data_scale(VAE(2, 2, [8], likelihood="laplace"), x / 50) is None
        assert check_data_scale(VAE(2, 2, [8]), torch.bernoulli(torch.full((9, 2), 0.5))) is None
    with pytest.warns(DataScaleWarning, match=r"~0.00\d+ .*Laplace"):  # far below 1 too
        check_data_scale(VAE(2, 2, [8], likelihood="laplace"), x * 1e-4)


# ------------------------------------------------------------------------------- likelihoods and models


def test_linear_model_refuses_any_likelihood_but_gaussian():
    model, _ = build_model_and_guide(TrainConfig(model="linear", x_dim=4, z_dim=2))  # the model's own default
    assert isinstance(model, LinearGaussian)
    with pytest.raises(ValueError, match="--model linear is Gaussian by construction .* --likelihood bernoulli: drop"):
        build_model_and_guide(TrainConfig(model="linear", likelihood="bernoulli", x_dim=4, z_dim=2))
    guides = {"hvae2": "hvae2", "cvae": "conditional", "ssvae": "ssvae"}
    for name in ("vae", "hvae2", "mog", "vamp", "cvae", "ssvae"):  # the others build it from --likelihood
        model, _ = build_model_and_guide(TrainConfig(model=name, guide=guides.get(name, "gaussian"), num_classes=3,
                                                     likelihood="laplace", x_dim=4, z_dim=2, hidden=[4]))
        assert model.likelihood.name == "laplace", name


# ------------------------------------------------------------------------------- any data shape


def test_image_shape_for_flat_rows(tmp_path):
    np.save(tmp_path / "flat.npy", np.random.default_rng(0).random((20, 784), dtype=np.float32))
    d = load_dataset(str(tmp_path / "flat.npy"), image_shape=(1, 28, 28))
    assert d.image_shape == (1, 28, 28) and d.x_dim == 784
    assert load_dataset(str(tmp_path / "flat.npy")).image_shape is None
    with pytest.raises(DataError, match=r"--image-shape 1 28 27 does not fit rows of 784 features: .*C\*H\*W = 784"):
        load_dataset(str(tmp_path / "flat.npy"), image_shape=(1, 28, 27))
    with pytest.raises(ValueError, match="image_shape = .*must be a list of 3 integers"):
        TrainConfig(image_shape=[28, 28])
    from pyro_vae.cli import _add_train_flags, _train_config

    p = argparse.ArgumentParser()
    p.add_argument("--config")
    _add_train_flags(p)
    assert {"image_shape", "standardize"} <= set(p.parse_args([]).train_flags)
    args = p.parse_args(["--image-shape", "1", "28", "28", "--standardize", "--likelihood", "gaussian"])
    config = _train_config(args)
    assert config.image_shape == [1, 28, 28] and config.standardize
    np.save(tmp_path / "stack.npy", np.zeros((10, 28, 28), np.float32))
    assert load_dataset(str(tmp_path / "stack.npy")).image_shape == (1, 28, 28)


@pytest.mark.parametrize("features", [2, 10])
def test_points_with_any_number_of_features(tmp_path, features):
    x = torch.randn(101, features) * 4 + 1
    np.save(tmp_path / "x.npy", x.numpy().astype(np.float64))
    d = load_dataset(str(tmp_path / "x.npy"))
    assert d.x_dim == features and d.image_shape is None and (len(d.train), len(d.test)) == (91, 10)
    assert torch.equal(torch.sort(torch.cat([d.train, d.test]), 0).values, torch.sort(x.float(), 0).values)
    torch.save({"x": x, "y": (torch.arange(101) % 3).double()}, tmp_path / "x.pt")  # float class ids
    d = load_dataset(str(tmp_path / "x.pt"), validation=11)
    assert d.num_classes == 3 and d.train_labels.dtype == torch.long and len(d.valid_labels) == 11
    torch.save({"x": x, "y": torch.rand(101)}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="class ids"):
        load_dataset(str(tmp_path / "bad.pt"))
    s = load_dataset(str(tmp_path / "x.npy"), standardize=True)
    assert s.train.mean(0).abs().max() < 1e-5 and (s.train.std(0, unbiased=False) - 1).abs().max() < 1e-5
    model = VAE(features, 2, [8], likelihood="gaussian")
    anomalies = load_points(tmp_path / "x.npy", features, model=model, standardization=s.standardization)
    assert anomalies == pytest.approx(s.standardization.apply(x))
    with pytest.raises(DataError, match="values outside the model's observed site 'x' .*grey levels"):
        load_points(tmp_path / "x.npy", features, model=VAE(features, 2, [8]))


def test_constant_feature_is_guarded():
    x = torch.cat([torch.randn(50, 1), torch.full((50, 1), 7.0)], 1)
    s = Standardization.fit(x)
    assert s.sd[1] == 1.0 and torch.isfinite(s.apply(x)).all() and s.apply(x)[:, 1].abs().max() == 0
    assert torch.allclose(s.invert(s.apply(x)), x)
