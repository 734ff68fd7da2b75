import dataclasses
import json
import sys

import pytest
import torch

import pyro_vae.programs
from pyro_vae.checks import DataError
from pyro_vae.config import TrainConfig, build_model_and_guide
from pyro_vae.errors import ConfigError
from pyro_vae.guides import GaussianGuide
from pyro_vae.models import VAE
from pyro_vae.objectives import Objective, SiteMismatchError, make_estimator
from pyro_vae.registry import UnknownNameError
from pyro_vae.run import CheckpointError, load_checkpoint, load_run, read_metrics
from pyro_vae.training import TrainingDiverged, train


def small_config(**kw):
    base = dict(preset="iwae1", epochs=2, batch_size=100, train_size=2000, test_size=500, device="cpu")
    return TrainConfig.from_dict({**base, **kw})


def test_training_writes_a_self_describing_run(tmp_path, small_mnist):
    rows = train(small_config(), tmp_path, quiet=True, dataset=small_mnist)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["test_loss"] < rows[0]["test_loss"] < 250  # learning, in nats per image
    for key in ("epoch", "train_loss", "test_loss", "epoch_time_s", "beta"):
        assert key in rows[0]
    assert read_metrics(tmp_path) == rows
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["x_dim"] == 784 and config["hidden"] == [200, 200] and config["z_dim"] == 50
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and "optimizer" in state and "rng" in state
    _, model, guide = load_run(tmp_path)
    assert isinstance(model, VAE) and isinstance(guide, GaussianGuide)


def test_iwae1_output_bias_is_the_logit_of_the_training_mean(small_mnist):
    config = small_config()
    config.x_dim = 784
    model, _ = build_model_and_guide(config, small_mnist.train_mean())
    p = torch.sigmoid(model.decoder.out_layer.bias)
    assert torch.allclose(p, small_mnist.train_mean().clamp(1e-3, 1 - 1e-3), atol=1e-5)


def test_resumed_run_equals_uninterrupted_run_bitwise(tmp_path, small_mnist):
    """With a decaying learning rate too: the resumed epoch runs at lr * decay ** (epoch - 1)."""
    full = train(small_config(epochs=3, lr_decay=0.5), tmp_path / "full", quiet=True, dataset=small_mnist)
    assert [r["lr"] for r in full] == [1e-3, 5e-4, 2.5e-4]
    train(small_config(epochs=2, lr_decay=0.5), tmp_path / "part", quiet=True, dataset=small_mnist)
    resumed_config = small_config(epochs=3, lr_decay=0.5)
    resumed = train(resumed_config, tmp_path / "part", resume=True, quiet=True, dataset=small_mnist)
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    for part in ("model", "guide"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]  # noqa: E731
    assert strip(full) == strip(resumed)


def test_kl_warmup_is_recorded_per_epoch(tmp_path, small_mnist):
    rows = train(small_config(epochs=3, warmup_epochs=2), tmp_path, quiet=True, dataset=small_mnist)
    assert [r["beta"] for r in rows] == [0.5, 1.0, 1.0]


class ExplodingVAE(VAE):
    """Gives NaN logits from the 16th training step on: a stand-in for a run that diverges."""

    calls = 0

    def decode(self, z):
        ExplodingVAE.calls += torch.is_grad_enabled() and pyro_vae.programs._inside_objective[0] > 0
        h = self.decoder(z)
        return self.likelihood(h * float("nan") if ExplodingVAE.calls > 15 else h)


def test_divergence_stops_with_a_diagnosis_and_keeps_the_last_good_checkpoint(tmp_path, small_mnist):
    ExplodingVAE.calls = 0
    # its Python step counter is state a traced replay would not advance: eager steps
    config = small_config(model="test_train:ExplodingVAE", epochs=3, train_size=1000, jit=False)
    data = small_mnist
    with pytest.raises(TrainingDiverged, match=r"epoch 2.*last good checkpoint \(epoch 1\).*--lr"):
        train(config, tmp_path, quiet=True, dataset=dataclasses.replace(data, train=data.train[:1000]))
    assert load_checkpoint(tmp_path)["epoch"] == 1


def test_user_errors_name_the_problem(tmp_path, small_mnist):
    with pytest.raises(ConfigError, match="model = 'nonsense': must be one of .*vae"):
        train(small_config(model="nonsense"), tmp_path, quiet=True, dataset=small_mnist)
    with pytest.raises(UnknownNameError, match="Known estimators: .*elbo.*meanfield"):
        make_estimator("nonsense")
    with pytest.raises(ConfigError, match="preset = 'huge': must be one of seed, iwae1, iwae2"):
        small_config(preset="huge")
    with pytest.raises(ConfigError, match=r"lr_decay = 1.5: must be a finite number > 0 and <= 1"):
        small_config(lr_decay=1.5)
    with pytest.raises(DataError, match=r"GaussianGuide expects data of shape \(batch, 784\), got \(4, 100\)"):
        Objective(VAE(), GaussianGuide(), make_estimator("elbo"))(torch.rand(4, 100))
    with pytest.raises(DataError, match=r"bernoulli likelihood needs .* \[0, 1\].*x / 255"):
        VAE().likelihood.check_support(torch.rand(4, 784) * 255)


class OtherSiteGuide(GaussianGuide):
    latent_sites = ("w",)


def test_model_and_guide_with_different_sites_fail_at_construction():
    with pytest.raises(SiteMismatchError, match=r"guide does not sample \['z'\].*no latent site \['w'\]"):
        Objective(VAE(), OtherSiteGuide(), make_estimator("elbo"))


def test_corrupt_checkpoint_gets_a_clear_error(tmp_path, small_mnist):
    train(small_config(epochs=1), tmp_path, quiet=True, dataset=small_mnist)
    for junk in (b"not a checkpoint", b"", b"PK\x03\x04junk"):  # pickle, empty, broken zip
        (tmp_path / "checkpoint.pt").write_bytes(junk)
        with pytest.raises(CheckpointError, match="damaged or not a pyro-vae checkpoint") as raised:
            load_run(tmp_path)
        assert "weights_only" not in str(raised.value)  # torch's advice would run arbitrary code
    with pytest.raises(CheckpointError, match="not a run directory"):
        load_run(tmp_path / "missing")


@pytest.mark.parametrize("estimator", ["elbo", "meanfield", "elbo:K=3"])
def test_jit_gives_the_same_run_as_eager(tmp_path, small_mnist, estimator):
    """The traced objective (the default) replays the same ops, random draws and parameters as
    --no-jit's eager steps."""
    data = dataclasses.replace(small_mnist, train=small_mnist.train[:1050])  # 10 full + 1 short batch
    kw = dict(epochs=1, estimator=estimator, warmup_epochs=1)
    eager = train(small_config(jit=False, **kw), tmp_path / "eager", quiet=True, dataset=data)
    jit = train(small_config(**kw), tmp_path / "jit", quiet=True, dataset=data)
    assert (eager[0]["jit"], jit[0]["jit"]) == (False, True)
    assert jit[0]["train_loss"] == pytest.approx(eager[0]["train_loss"], rel=1e-5)
    a, b = load_checkpoint(tmp_path / "eager"), load_checkpoint(tmp_path / "jit")
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5), k


def test_tensorboard_logs_or_says_how_to_install_it(tmp_path, small_mnist):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"pip install 'pyro-vae\[tensorboard\]'"):
            train(small_config(epochs=1, tensorboard=True), tmp_path, quiet=True, dataset=small_mnist)
    else:
        train(small_config(epochs=1, tensorboard=True), tmp_path, quiet=True, dataset=small_mnist)
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_early_stopping_keeps_the_best_validation_epoch(tmp_path, capsys):
    # 200 training images and batches of 20: the seed net overfits within a few epochs, so the
    # validation loss turns up and the run stops `early_stopping` epochs after its best epoch
    run = tmp_path / "run"
    config = TrainConfig.from_dict(dict(preset="seed", dataset="binarized-mnist", train_size=300, validation=100,
                                        test_size=100, epochs=60, batch_size=20, lr=3e-3, early_stopping=3,
                                        device="cpu"))
    rows = train(config, run)
    best = min(rows, key=lambda r: r["valid_loss"])
    assert len(rows) < 60 and rows[-1]["epoch"] - best["epoch"] == 3
    assert "early stopping after epoch" in capsys.readouterr().err
    state = load_checkpoint(run, best=True)
    assert state["epoch"] == best["epoch"] and state["criterion"] == "valid_loss"
    _, model, _ = load_run(run, best=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state["model"].values()))
    _, last, _ = load_run(run)
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), last.state_dict().values()))
    assert len(train(dataclasses.replace(config, epochs=80), run, resume=True)) == len(rows)  # patience spent
    with pytest.raises(ValueError, match="--validation"):
        train(dataclasses.replace(config, validation=0), tmp_path / "other")
    plain = tmp_path / "plain"
    train(dataclasses.replace(config, validation=0, early_stopping=0, epochs=1), plain, quiet=True)
    assert not (plain / "best.pt").exists()
    with pytest.raises(CheckpointError, match="validation split"):
        load_run(plain, best=True)


def test_tensorboard_logs_every_metric_and_a_sample_grid_per_epoch(tmp_path, small_mnist, monkeypatch):
    """--tensorboard through a stand-in SummaryWriter (tensorboard is an optional extra): each
    epoch's numeric metrics as scalars and a grid of prior samples as an image; without the
    package, one line naming the extra."""
    import types

    logged = []

    class Writer:
        def __init__(self, log_dir):
            logged.append(("dir", log_dir))

        def add_scalar(self, key, value, step):
            logged.append(("scalar", key, step))

        def add_image(self, key, image, step):
            logged.append(("image", key, tuple(image.shape), step))

        def flush(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train(small_config(tensorboard=True), tmp_path / "run", quiet=True, dataset=small_mnist)
    assert ("dir", str(tmp_path / "run" / "tensorboard")) in logged
    for epoch in (1, 2):
        assert ("scalar", "train_loss", epoch) in logged and ("scalar", "test_loss", epoch) in logged
        assert ("image", "samples", (3, 242, 242), epoch) in logged  # 8 x 8 digits of 28 + 2 padding
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    with pytest.raises(ConfigError, match=r"pip install .pyro-vae\[tensorboard\]."):
        train(small_config(tensorboard=True), tmp_path / "other", quiet=True, dataset=small_mnist)


def test_a_users_callback_sees_every_epoch_and_can_stop_training(tmp_path, small_mnist):
    import pyro_vae

    class StopWhenGoodEnough(pyro_vae.Callback):
        def __init__(self):
            self.seen = []

        def on_train_start(self, state):
            self.seen.append(("start", state.epoch, len(state.metrics)))

        def on_epoch_end(self, state, row):
            assert (state.run_dir / "checkpoint.pt").exists()  # the built-in ones ran first
            self.seen.append(("epoch", row["epoch"], round(row["test_loss"], 3)))
            state.stop = row["epoch"] == 2

        def on_train_end(self, state):
            self.seen.append(("end", state.epoch, len(state.metrics)))

    callback = StopWhenGoodEnough()
    rows = train(small_config(epochs=5), tmp_path / "run", quiet=True, dataset=small_mnist, callbacks=[callback])
    assert [r["epoch"] for r in rows] == [1, 2] and [m["epoch"] for m in read_metrics(tmp_path / "run")] == [1, 2]
    assert callback.seen == [("start", 0, 0), ("epoch", 1, round(rows[0]["test_loss"], 3)),
                             ("epoch", 2, round(rows[1]["test_loss"], 3)), ("end", 2, 2)]
