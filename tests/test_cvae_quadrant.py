"""MNIST quadrant completion (cvae-quadrant) on real MNIST: the tutorial's masks, only the hidden
pixels scored, completions that depend on the given quadrants."""

import math

import pytest
import torch
from pyro import poutine

from pyro_vae.cli import main
from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.evaluation import evaluate
from pyro_vae.models.cvae import quadrant_mask
from pyro_vae.run import load_run
from pyro_vae.training import train


def test_quadrant_masks_follow_the_tutorial():
    hidden = [quadrant_mask((1, 28, 28), q).reshape(28, 28) for q in (1, 2, 3)]
    assert [int(h.sum()) for h in hidden] == [588, 392, 196]
    assert not hidden[0][14:, :14].any() and hidden[0][:14].all()  # 1: the bottom-left is given
    assert not hidden[1][:, :14].any() and hidden[1][:, 14:].all()  # 2: the left half
    assert hidden[2][14:, 14:].all() and int(hidden[2].sum()) == 196  # 3: all but the bottom-right
    with pytest.raises(ValueError, match="1, 2 or 3"):
        quadrant_mask((1, 28, 28), 4)


@pytest.fixture(scope="module")
def quadrant_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("quadrant") / "run"
    data = load_dataset("mnist", "cpu", train_size=5000, test_size=200)
    config = TrainConfig.from_dict(dict(dataset="mnist", model="cvae-quadrant", guide="gaussian", z_dim=20,
                                        hidden=[256], epochs=2, seed=0, device="cpu", estimator="elbo",
                                        model_options={"quadrants": 2}))
    train(config, run, quiet=True, dataset=data)
    return run, data


def test_only_the_hidden_pixels_are_scored(quadrant_run):
    run, data = quadrant_run
    _, model, guide = load_run(run)
    x = data.test[:50]
    z = guide.posterior(x).mean
    pixels = model.decode(z, model.visible(x)).base_dist.log_prob(x)  # (50, 784)
    expected = model.prior(y=model.visible(x)).log_prob(z) + pixels[:, model.hidden_mask].sum(-1)
    trace = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(x)
    assert torch.allclose(trace.log_prob_sum(), expected.sum(), rtol=1e-5)
    assert (pixels.sum(-1) < pixels[:, model.hidden_mask].sum(-1) - 1).all()  # visible ones left out


def test_completions_depend_on_the_given_quadrants(quadrant_run):
    run, data = quadrant_run
    _, model, guide = load_run(run)
    x = data.test
    torch.manual_seed(0)
    result = evaluate(model, guide, x, k=20)
    own = result["test_log_likelihood"]
    assert result["test_bits_per_dim"] == pytest.approx(-own / (392 * math.log(2)))  # hidden pixels only
    # the same hidden halves given the visible halves of other images
    swapped = torch.where(model.hidden_mask, x.roll(1, 0), x)
    other = evaluate(model, guide, swapped, k=20)["test_log_likelihood"]
    assert own > other + 8  # nats per image: the left half says much about the right half
    done = model.complete(x[:20], n=3)
    assert done.shape == (3, 20, 784)
    assert torch.equal(done[:, :, ~model.hidden_mask], x[:20, ~model.hidden_mask].expand(3, -1, -1))
    err_own = ((done.mean(0) - x[:20])[:, model.hidden_mask] ** 2).sum(-1).mean()
    err_other = ((done.mean(0) - x[:20].roll(1, 0))[:, model.hidden_mask] ** 2).sum(-1).mean()
    assert err_own < 0.8 * err_other


def test_quadrant_model_has_no_unconditional_samples(quadrant_run):
    run, _ = quadrant_run
    assert main(["sample", str(run), "--n", "4"]) == 2  # a clear error naming model.complete
