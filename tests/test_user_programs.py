"""Users' own Pyro programs, written as Pyro users write them (tests/programs/, and Pyro's VAE
example in examples/pyro_example_vae.py), through the command line and from Python."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

import pyro_vae
from pyro_vae.cli import main
from pyro_vae.programs import Program, context_keys

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _programs_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "programs"))
    monkeypatch.syspath_prepend(str(ROOT / "examples"))


def cli(*args) -> int:
    return main([str(a) for a in args])


def mixture_2d(path: Path, n: int = 3000, scale: float = 1.0) -> Path:
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [6.0, 2.0], [-4.0, 5.0]])
    x = centers[torch.randint(0, 3, (n,), generator=g)] + torch.randn(n, 2, generator=g) * torch.tensor([1.0, 0.5])
    np.save(path, (scale * x).numpy().astype(np.float32))
    return path


def test_pyro_example_pair_trains_and_evaluates_by_import_path(tmp_path):
    run = tmp_path / "run"
    assert cli("train", "--model", "pyro_example_vae:VAE", "--guide", "pyro_example_vae:VAE",
               "--model-option", "hidden_dim=64", "--train-size", 1000, "--test-size", 100, "--epochs", 2,
               "--out", run, "--quiet") == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model_options"] == {"hidden_dim": 64}
    assert cli("eval", run, "--k", 50, "--quiet", "--trust-code") == 0
    r = json.loads((run / "eval.json").read_text())
    assert r["test_elbo"] <= r["test_log_likelihood"] < -100  # nats per 784 binary pixels
    _, model, guide = pyro_vae.load_run(run, trust_code=True)
    assert isinstance(model, Program) and model.owner is guide.owner  # one VAE serves both methods
    assert model.owner.decoder.fc1.out_features == 64


def test_constructor_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli("train", "--model", "pyro_example_vae:VAE", "--guide", "pyro_example_vae:VAE",
               "--model-option", "hiden_dim=64", "--out", run) == 2
    err = capsys.readouterr().err.strip()
    assert "takes no option 'hiden_dim'" in err and "z_dim, hidden_dim, use_cuda" in err and "\n" not in err
    assert cli("train", "--model", "needs_width:Model", "--guide", "gaussian", "--out", run) == 2
    err = capsys.readouterr().err.strip()
    assert "needs 'width'" in err and "--model-option width=VALUE" in err
    assert not run.exists()


def test_bernoulli_program_on_real_valued_data_stops_at_the_first_step(tmp_path, capsys):
    data = mixture_2d(tmp_path / "points.npy")
    run = tmp_path / "run"
    assert cli("train", "--model", "bernoulli_points:model", "--guide", "functional:guide",
               "--dataset", data, "--likelihood", "gaussian", "--out", run) == 2
    err = capsys.readouterr().err
    assert "outside the model's observed site 'x'" in err and "Bernoulli" in err and "Traceback" not in err
    assert not run.exists()


def test_functions_with_pyro_param_train_save_and_load(tmp_path):
    data = mixture_2d(tmp_path / "points.npy")
    run = tmp_path / "run"
    metrics = pyro_vae.train(pyro_vae.TrainConfig(model="functional:model", guide="functional:guide",
                                                  dataset=str(data), likelihood="gaussian", epochs=3,
                                                  estimator="elbo"), run, quiet=True)
    assert metrics[-1]["test_loss"] < metrics[0]["test_loss"] - 1.0
    config, model, guide = pyro_vae.load_run(run, trust_code=True)
    noise = pyro.param("noise")
    assert "noise" in model.found and abs(float(noise.detach()) - 0.5) > 0.01  # the learned value, reloaded
    x = torch.as_tensor(np.load(data))[:200]
    a = pyro_vae.evaluate(model, guide, x, k=64, psis=False)["test_log_likelihood"]
    _, model2, guide2 = pyro_vae.load_run(run, trust_code=True)
    b = pyro_vae.evaluate(model2, guide2, x, k=64, psis=False)["test_log_likelihood"]
    assert a == pytest.approx(b, abs=1e-6)


def test_pyro_svi_trains_the_builtins():
    from pyro_vae.data import load_dataset
    from pyro_vae.guides import GaussianGuide
    from pyro_vae.models import VAE

    data = load_dataset("binarized-mnist", "cpu", train_size=2000, test_size=100)
    model, guide = VAE(z_dim=20), GaussianGuide(z_dim=20)
    svi = SVI(model, guide, Adam({"lr": 1e-3}), Trace_ELBO())
    losses = [svi.step(data.batch(torch.arange(i * 100 % 1900, i * 100 % 1900 + 100))) / 100 for i in range(60)]
    assert len(pyro.get_param_store()) == len(list(model.parameters())) + len(list(guide.parameters()))
    assert np.mean(losses[-10:]) < losses[0] - 250  # 549 nats at step 0, about 210 after 60 steps


def test_labels_reach_programs_that_name_y():
    from label_concat import Guide, Model

    model, guide = Program(Model(x_dim=4, z_dim=2, num_classes=3)), Program(Guide(x_dim=4, z_dim=2, num_classes=3))
    assert context_keys(model, guide) == ("y",)


def test_import_pyro_vae_is_the_api_and_stays_light():
    import subprocess

    code = ("import sys, pyro_vae; names = [pyro_vae.train, pyro_vae.load_run, pyro_vae.evaluate, "
            "pyro_vae.make_estimator, pyro_vae.TrainConfig, pyro_vae.Objective]; "
            "print(all(callable(n) for n in names), 'arviz' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]


# -- particles for programs that do not broadcast ------------------------------------------------

def _label_pair():
    from label_concat import Guide, Model

    pyro.set_rng_seed(0)
    x = torch.bernoulli(torch.full((6, 20), 0.4))
    return Model(x_dim=20, z_dim=3, num_classes=4), Guide(x_dim=20, z_dim=3, num_classes=4), x, torch.randint(0, 4, (6,))


@pytest.mark.parametrize("spec", ["iwae:K=5", "dreg:K=5", "stl:K=3", "piwae:M=2,K=2", "miwae:M=2,K=3", "renyi:alpha=0.5,K=4"])
def test_importance_weighted_estimators_repeat_the_batch_for_programs_that_do_not_broadcast(spec):
    from pyro_vae.objectives import make_estimator
    from pyro_vae.objectives.base import REPEATED

    model, guide, x, y = _label_pair()
    with pytest.raises(RuntimeError):  # the program really does not broadcast over particles
        from pyro_vae.objectives.base import pair_traces

        pair_traces(model, guide, (x,), {"y": y}, 2, 1)
    est = make_estimator(spec)
    loss = est.differentiable_loss(model, guide, x, y=y)
    loss.backward()
    assert est.layout == REPEATED and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in guide.parameters())


def test_repeated_batch_at_one_particle_equals_trace_elbo():
    from pyro_vae.objectives import make_estimator

    model, guide, x, y = _label_pair()
    pyro.set_rng_seed(3)
    a = make_estimator("iwae").differentiable_loss(model, guide, x, y=y)
    pyro.set_rng_seed(3)
    b = Trace_ELBO().differentiable_loss(model, guide, x, y=y)
    assert float(a) == pytest.approx(float(b), abs=1e-5)


def test_repeated_batch_keeps_each_point_with_its_own_particles():
    """With the exact posterior as guide every weight of point i is p(x_i): IWAE_K is then the
    exact log p(x) in either layout, and any mixing of rows across points would show."""
    from test_objectives import ExactPosteriorGuide

    from pyro_vae.models.vae import LinearGaussian
    from pyro_vae.objectives import make_estimator
    from pyro_vae.objectives.base import REPEATED, VECTORIZED

    pyro.set_rng_seed(0)
    model = LinearGaussian(4, 2, noise_scale=0.5).double()
    guide = ExactPosteriorGuide(model).double()
    x = torch.randn(7, 4, dtype=torch.float64) * 2
    exact = float(model.log_marginal(x).sum())
    for layout in (VECTORIZED, REPEATED):
        for spec in ("iwae:K=6", "dreg:K=6"):
            est = make_estimator(spec)
            est.max_plate_nesting, est.layout = 2, layout
            loss = est.differentiable_loss(model, guide, x)
            assert -float(loss) == pytest.approx(exact, abs=1e-5)
            if spec.startswith("dreg"):  # at the exact posterior DReG's guide gradient is zero
                g = torch.autograd.grad(loss, list(guide.parameters()))
                assert max(float(t.abs().max()) for t in g) < 1e-5


def test_evaluation_repeats_the_batch_for_programs_that_do_not_broadcast():
    """k > 1 from Python for a label-conditioned program written for one particle; the repeated
    layout draws the same noise as the vectorized one, so it gives the same numbers."""
    import pyro_vae.evaluation.likelihood as evaluation
    from pyro_vae.guides import GaussianGuide
    from pyro_vae.models import VAE
    from pyro_vae.objectives.base import REPEATED

    model, guide, x, y = _label_pair()
    x, y = x.repeat(5, 1), y.repeat(5)
    r = pyro_vae.evaluate(model, guide, x, k=300, y=y)
    chunked = pyro_vae.evaluate(model, guide, x, k=300, y=y, data_chunk=7, particle_chunk=128)
    assert r["test_elbo"] < r["test_log_likelihood"] == pytest.approx(chunked["test_log_likelihood"], abs=1e-6)

    pyro.set_rng_seed(0)
    vae, gaussian = VAE(x_dim=20, z_dim=3, hidden=[8]), GaussianGuide(x_dim=20, z_dim=3, hidden=[8])
    vectorized = pyro_vae.evaluate(vae, gaussian, x, k=200)
    original = evaluation.particle_layout_for
    evaluation.particle_layout_for = lambda *a: (REPEATED, 1)
    try:
        repeated = pyro_vae.evaluate(vae, gaussian, x, k=200)
    finally:
        evaluation.particle_layout_for = original
    for key in ("test_log_likelihood", "test_elbo", "rate", "distortion"):
        assert repeated[key] == pytest.approx(vectorized[key], abs=1e-4)


@pytest.mark.parametrize("spec", ["elbo:K=4", "meanfield:K=4"])
def test_monte_carlo_elbos_loop_over_particles_for_programs_that_do_not_broadcast(spec):
    from pyro_vae.objectives import make_estimator

    model, guide, x, y = _label_pair()
    est = make_estimator(spec)
    loss = est.differentiable_loss(model, guide, x, y=y)
    assert torch.isfinite(loss) and est.vectorize_particles is False  # Pyro's loop over particles


def test_standardized_runs_write_in_the_data_units(tmp_path):
    data = mixture_2d(tmp_path / "points.npy", scale=40.0)
    run = tmp_path / "run"
    assert cli("train", "--dataset", data, "--likelihood", "gaussian", "--standardize", "--z-dim", 2,
               "--epochs", 2, "--out", run, "--quiet") == 0
    for command in (["sample", "--n", 500], ["reconstruct"], ["eval", "--k", 20, "--quiet"], ["anomaly", "--k", 20]):
        assert cli(command[0], run, *command[1:]) == 0
    raw = np.load(data)
    samples, recon = np.load(run / "samples.npy"), np.load(run / "reconstructions.npy")
    assert np.abs(samples.std(0) / raw.std(0) - 1).max() < 0.5  # not the standardized unit scale
    assert np.abs(recon.mean(0) - raw.mean(0)).max() < 0.5 * raw.std(0).max()
    scores = np.load(run / "anomaly_scores.npz")["test_scores"]
    log_px = json.loads((run / "eval.json").read_text())["test_log_likelihood"]
    assert abs(-scores.mean() - log_px) < 0.5  # both -log p(x) in the data's units (k=20 each)
    assert log_px < -7  # 2-D points of scale ~40: log p(x) includes -2 log 40 of Jacobian
