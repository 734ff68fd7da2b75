"""The conditional VAE on real MNIST: labels as context through the loop, eval and sampling."""

import pytest
import torch

from pyro_vae.cli import main
from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.evaluation import evaluate
from pyro_vae.run import load_run, read_metrics
from pyro_vae.training import train


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cvae") / "run"
    data = load_dataset("binarized-mnist", "cpu", train_size=3000, test_size=300)
    config = TrainConfig.from_dict(dict(model="cvae", guide="conditional", z_dim=10, hidden=[256],
                                        epochs=3, seed=0, device="cpu"))
    train(config, run, quiet=True, dataset=data)
    return run, data


def test_cvae_explains_images_better_with_their_own_labels(cvae_run):
    run, data = cvae_run
    _, model, guide = load_run(run)
    torch.manual_seed(0)
    right = evaluate(model, guide, data.test, k=50, y=data.test_labels)
    wrong = evaluate(model, guide, data.test, k=50, y=(data.test_labels + 1) % 10)
    # log p(x | y) with the true class beats a wrong class by many nats per image
    assert right["test_log_likelihood"] > wrong["test_log_likelihood"] + 5
    assert read_metrics(run)[-1]["test_loss"] == pytest.approx(-right["test_elbo"], abs=3)


def test_sample_label_draws_one_class(cvae_run, tmp_path):
    run, _ = cvae_run
    out = tmp_path / "three.png"
    assert main(["sample", str(run), "--label", "3", "--n", "16", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main(["sample", str(run), "--label", "12"]) == 2  # not a class of this run


def test_cvae_needs_a_conditional_guide_and_labels():
    with pytest.raises(ValueError, match="--guide conditional"):
        from pyro_vae.config import build_model_and_guide
        build_model_and_guide(TrainConfig.from_dict(dict(model="cvae", x_dim=784, num_classes=10)))
