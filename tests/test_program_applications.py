"""Every application works from the Pyro programs themselves: Pyro's VAE example pair (a class with
``model``/``guide`` methods, sites "latent" and "obs", ``pyro.module``) has no decode, sample,
posterior or prior method, and still gets samples, reconstructions, paths, traversals and
imputations; and data that are not images (2-D points) go through every command."""

import json
import sys
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_vae import cli
from pyro_vae.applications import (
    decode_mean,
    imputation_error,
    impute,
    interpolate,
    latent_codes,
    missing_mask,
    most_active_dims,
    prior_samples,
    reconstruct,
    traverse,
)
from pyro_vae.guides import GaussianGuide
from pyro_vae.models import VAE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from pyro_example_vae import VAE as PyroExample  # noqa: E402  Pyro's examples/vae/vae.py, re-typed


def PyroExampleVAE():  # noqa: N802
    return PyroExample(z_dim=10, hidden_dim=200)


@pytest.fixture(scope="module")
def trained(small_mnist):
    """The example pair after 400 steps of Pyro's own SVI (batch 100) on 2,000 binarized digits."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = PyroExampleVAE()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    x = small_mnist.train
    for step in range(400):
        svi.step(x[(step % 20) * 100:(step % 20 + 1) * 100])
    return vae, small_mnist


def by_hand(vae, x):
    """The example's decoder mean at the encoder mean, computed directly from its networks."""
    with torch.no_grad():
        return vae.decoder(vae.encoder(x)[0])


def test_pyro_example_reconstructions_and_codes_come_from_traces(trained):
    vae, data = trained
    x = data.test[:50]
    assert not any(hasattr(vae, m) for m in ("decode", "sample", "posterior", "prior"))
    codes = latent_codes(vae.model, vae.guide, x)
    assert list(codes.values) == ["latent"] and torch.allclose(codes.values["latent"], vae.encoder(x)[0].detach())
    recon = reconstruct(vae.model, vae.guide, x)
    assert torch.allclose(recon, by_hand(vae, x), atol=1e-6)
    # trained: the reconstructions explain the test digits far better than the mean image does
    bce = lambda p: float(nn.functional.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6).expand_as(x), x))  # noqa: E731
    assert bce(recon) < 0.75 * bce(data.train.mean(0, keepdim=True))  # measured 0.155 against 0.253
    # a draw z ~ q(z|x) replayed through the model (Pyro's reconstruct_img) stays near the mean one
    drawn = reconstruct(vae.model, vae.guide, x, draw=True)
    assert drawn.shape == (50, 784) and not torch.allclose(drawn, recon) and bce(drawn) < 1.2 * bce(recon)  # measured 0.159
    z = torch.randn(5, 10)
    assert torch.allclose(decode_mean(vae.model, {"latent": z}, x[:5]), vae.decoder(z).detach(), atol=1e-6)


def test_pyro_example_prior_samples_are_the_decoder_at_prior_draws(trained):
    vae, data = trained
    pyro.set_rng_seed(3)
    means = prior_samples(vae.model, 16, data.test)
    pyro.set_rng_seed(3)
    z = dist.Normal(torch.zeros(16, 10), torch.ones(16, 10)).sample()  # the model's first draw
    assert means.shape == (16, 784) and torch.allclose(means, vae.decoder(z).detach(), atol=1e-6)
    assert 0 <= float(means.min()) and float(means.max()) <= 1
    draws = prior_samples(vae.model, 16, data.test, mean=False)
    assert draws.shape == (16, 784) and set(draws.unique().tolist()) <= {0.0, 1.0}


def test_pyro_example_interpolations_and_traversals_decode_the_codes(trained):
    vae, data = trained
    x_a, x_b = data.test[:3], data.test[3:6]
    loc_a, loc_b = vae.encoder(x_a)[0].detach(), vae.encoder(x_b)[0].detach()
    path = interpolate(vae.model, vae.guide, x_a, x_b, steps=5, method="linear")
    assert path.shape == (3, 5, 784)
    assert torch.allclose(path[:, 0], by_hand(vae, x_a), atol=1e-6)
    assert torch.allclose(path[:, -1], by_hand(vae, x_b), atol=1e-6)
    assert torch.allclose(path[:, 2], vae.decoder((loc_a + loc_b) / 2).detach(), atol=1e-6)
    grid = traverse(vae.model, vae.guide, x_a[:1], dims=[4, 7], span=2.0, steps=3)
    assert grid.shape == (1, 2, 3, 784)
    moved = loc_a[:1].repeat(3, 1)
    moved[:, 7] = torch.tensor([-2.0, 0.0, 2.0])
    assert torch.allclose(grid[0, 1], vae.decoder(moved).detach(), atol=1e-6)
    variances = vae.encoder(data.test[:200])[0].detach().var(0)
    assert most_active_dims(vae.model, vae.guide, data.test[:200], 3) == variances.argsort(descending=True)[:3].tolist()


def test_pyro_example_imputes_better_than_the_training_mean(trained):
    vae, data = trained
    x = data.test[:40]
    ratios = {}
    for pattern, shape in (("bottom-half", (1, 28, 28)), ("random", None)):
        observed = ~missing_mask(len(x), 784, shape, pattern, fraction=0.5)
        r = impute(vae.model, vae.guide, x, observed, num_steps=60, burn_in=20)
        assert torch.equal(r["mean"][observed], x[observed]) and 0 < r["acceptance"] <= 1
        baseline = imputation_error(x, torch.where(observed, x, data.train.mean(0)), observed)
        ratios[pattern] = imputation_error(x, r["mean"], observed) / baseline
    # measured RMSE 0.275 against 0.295 (bottom half) and 0.258 against 0.303 (half the pixels at random)
    assert ratios["bottom-half"] < 0.97 and ratios["random"] < 0.9


def test_the_trace_path_gives_the_built_in_fast_path_numbers():
    # the same built-in pair, once as modules (decode/posterior/sample/prior: the fast path) and
    # once as plain functions, which offer nothing but the programs
    torch.manual_seed(0)
    model = VAE(x_dim=12, z_dim=3, hidden=[16], likelihood="gaussian")
    guide = GaussianGuide(x_dim=12, z_dim=3, hidden=[16])

    def model_fn(x, **context):
        return model(x, **context)

    def guide_fn(x, **context):
        return guide(x, **context)

    x = torch.randn(6, 12)
    assert torch.allclose(reconstruct(model_fn, guide_fn, x), reconstruct(model, guide, x), atol=1e-6)
    assert torch.allclose(reconstruct(model, guide, x), model.decode(guide.posterior(x).mean).mean, atol=1e-6)
    for method in ("slerp", "linear"):
        assert torch.allclose(interpolate(model_fn, guide_fn, x[:3], x[3:], 4, method),
                              interpolate(model, guide, x[:3], x[3:], 4, method), atol=1e-6)
    assert torch.allclose(traverse(model_fn, guide_fn, x[:2], [2, 0], 1.5, 5),
                          traverse(model, guide, x[:2], [2, 0], 1.5, 5), atol=1e-6)
    assert most_active_dims(model_fn, guide_fn, x, 2) == most_active_dims(model, guide, x, 2)
    pyro.set_rng_seed(1)
    fast = prior_samples(model, 5, x)
    pyro.set_rng_seed(1)
    assert torch.allclose(prior_samples(model_fn, 5, x), fast, atol=1e-6)
    observed = torch.arange(12) < 6
    a = impute(model, guide, x, observed, num_steps=30, burn_in=10)
    b = impute(model_fn, guide_fn, x, observed, num_steps=30, burn_in=10)
    assert torch.allclose(a["mean"], b["mean"], atol=1e-4) and a["acceptance"] == b["acceptance"]


def test_what_cannot_be_done_says_why():
    def model(x):
        with pyro.plate("rows", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=torch.zeros(3)))
            z = pyro.sample("z", dist.Normal(c.float(), 1.0))
            pyro.sample("x", dist.MultivariateNormal(z[:, None].expand(-1, 2), torch.eye(2)), obs=x)

    def guide(x):
        with pyro.plate("rows", x.shape[0]):
            pyro.sample("c", dist.Categorical(logits=x[:, :1].expand(-1, 3)))
            pyro.sample("z", dist.Normal(x[:, 0], 1.0))

    x = torch.randn(4, 2)
    codes = latent_codes(model, guide, x)
    assert codes.discrete == ("c",) and torch.equal(codes.values["z"], x[:, 0])
    assert reconstruct(model, guide, x).shape == (4, 2)  # a class code is decoded at its mode
    with pytest.raises(ValueError, match="site 'c' is discrete"):
        interpolate(model, guide, x[:2], x[2:])
    with pytest.raises(ValueError, match="factorizes over features.*MultivariateNormal"):
        impute(model, guide, x, torch.tensor([True, False]), num_steps=2, burn_in=0)

    def enumerated(x):  # a mixture prior whose component only the model samples
        with pyro.plate("rows", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=torch.zeros(3)), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(c.float(), 1.0))
            pyro.sample("x", dist.Normal(z[:, None].expand(-1, 2), 1.0).to_event(1), obs=x)

    def z_only(x):
        with pyro.plate("rows", x.shape[0]):
            pyro.sample("z", dist.Normal(x[:, 0], 1.0))

    assert interpolate(enumerated, z_only, x[:2], x[2:], steps=3).shape == (2, 3, 2)
    with pytest.raises(ValueError, match=r"also samples \['c'\]"):
        impute(enumerated, z_only, x, torch.tensor([True, False]), num_steps=2, burn_in=0)


def pyro_vae(*args) -> int:
    return cli.main([str(a) for a in args])


def test_two_dimensional_points_get_every_command(tmp_path, capsys):
    from pyro_vae.config import TrainConfig
    from pyro_vae.training import train

    g = np.random.default_rng(0)
    centres = np.array([[-2.0, -2.0], [2.0, -2.0], [0.0, 2.0]])
    points = (centres[g.integers(0, 3, 1000)] + 0.3 * g.standard_normal((1000, 2))).astype(np.float32)
    np.save(tmp_path / "mixture.npy", points)
    run = tmp_path / "run"
    train(TrainConfig.from_dict(dict(dataset=str(tmp_path / "mixture.npy"), likelihood="gaussian", z_dim=2,
                                     hidden=[32], epochs=2, batch_size=50, seed=0)), run, quiet=True)
    assert pyro_vae("sample", run, "--n", 40) == 0
    assert np.load(run / "samples.npy").shape == (40, 2)
    assert pyro_vae("reconstruct", run, "--n", 30) == 0
    assert np.load(run / "reconstructions.npy").shape == (30, 2)
    assert pyro_vae("interpolate", run, "--pairs", 3, "--steps", 6) == 0
    assert np.load(run / "interpolations.npy").shape == (3, 6, 2)
    assert pyro_vae("traverse", run, "--num-dims", 2, "--steps", 7) == 0
    assert np.load(run / "traversals.npy").shape == (2, 7, 2)
    capsys.readouterr()
    assert pyro_vae("impute", run, "--missing", "bottom-half") == 2
    assert "use --missing random" in capsys.readouterr().err
    assert pyro_vae("impute", run, "--n", 50, "--steps", 40, "--burn-in", 10) == 0  # random: the default here
    imputed = json.loads((run / "impute.json").read_text())
    assert np.load(run / "imputations.npy").shape == (50, 2) and 0 < imputed["acceptance"] <= 1
    assert pyro_vae("anomaly", run, "--k", 20) == 0
    assert len(np.load(run / "anomaly_scores.npz")["test_scores"]) == 100  # the last 10% of the file
    for name in ("samples", "reconstructions", "interpolations", "traversals", "imputations", "anomalies"):
        assert (run / "figures" / f"{name}.png").stat().st_size > 10_000
