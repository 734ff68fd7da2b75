"""Semi-supervised M2 on real MNIST with 100 labels: enumeration, labels hidden, classifier."""

import pyro
import pytest
import torch
from pyro.infer import TraceEnum_ELBO

from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.objectives import make_estimator
from pyro_vae.run import load_run
from pyro_vae.training import accuracy, train


def test_keep_labels_hides_all_but_n_balanced_labels():
    data = load_dataset("mnist", "cpu", train_size=2000, test_size=10).keep_labels(100)
    known = data.train_labels[data.train_labels >= 0]
    assert len(known) == 100 and torch.equal(torch.bincount(known), torch.full((10,), 10))


def test_semi_supervised_epochs_keep_labelled_and_unlabelled_rows_in_separate_batches():
    data = load_dataset("mnist", "cpu", train_size=2000, test_size=10).keep_labels(100)
    batches = data.epoch_batches(40, torch.Generator().manual_seed(0))
    rows = torch.cat(batches)
    assert torch.equal(rows.sort().values, torch.arange(2000))  # every row once
    kinds = [bool((data.train_labels[b] >= 0).all()) for b in batches]
    assert all(k or bool((data.train_labels[b] < 0).all()) for k, b in zip(kinds, batches))
    where = [i for i, k in enumerate(kinds) if k]
    assert len(where) == 3 and where[0] == 1 and where[-1] < len(batches) - 5  # spread out, not bunched at the end


def test_labelled_every_cycles_the_labelled_rows_between_unlabelled_batches():
    data = load_dataset("mnist", "cpu", train_size=2000, test_size=10).keep_labels(100)
    batches = data.epoch_batches(40, torch.Generator().manual_seed(0), labelled_every=2)
    kinds = [bool((data.train_labels[b] >= 0).all()) for b in batches]
    assert kinds[:7] == [False, True, False, False, True, False, False]  # unlabelled, labelled, then 2 : 1
    assert sum(kinds) == 48 // 2  # 48 unlabelled batches
    seen = torch.bincount(torch.cat([b for b, k in zip(batches, kinds) if k]), minlength=2000)[data.labelled_rows]
    assert bool((seen == 8).all())  # 24 labelled batches = 8 whole passes of 3 (40 + 40 + 20 rows)


def test_ssvae_with_100_labels_classifies_far_above_chance(tmp_path):
    data = load_dataset("mnist", "cpu", validation=500, train_size=3500, test_size=1000)
    config = TrainConfig.from_dict(dict(model="ssvae", guide="ssvae", estimator="enum", labels=100, labelled_every=4, z_dim=50,
                                        hidden=[500], activation="softplus", epochs=2, batch_size=200,
                                        lr=4.2e-4, seed=0, device="cpu"))
    rows = train(config, tmp_path / "run", quiet=True, dataset=data)
    assert rows[-1]["test_accuracy"] > 0.5  # chance is 0.1; the 100 labels in every 5th step
    assert rows[-1]["valid_accuracy"] > 0.5  # held-out training rows: for choosing the epoch
    _, model, guide = load_run(tmp_path / "run")
    assert accuracy(guide, data.test, data.test_labels) == rows[-1]["test_accuracy"]
    # with y summed out (no labels), the enum loss is finite and answers under no_grad (test losses)
    with torch.no_grad():
        assert torch.isfinite(make_estimator("enum").differentiable_loss(model, guide, data.test[:5]))


def test_labels_must_split_evenly():
    data = load_dataset("mnist", "cpu", train_size=500, test_size=10)
    with pytest.raises(ValueError, match="multiple of the 10 classes"):
        data.keep_labels(105)


def test_auxiliary_loss_counts_in_training_only():
    """The training loss of labelled rows carries alpha * CE(q(y|x), y); in eval mode (test loss,
    importance weights) the guide is q(y|x) q(z|x,y) alone, so the two differ by exactly that."""
    from pyro_vae.guides.ssvae import SSVAEGuide
    from pyro_vae.models.ssvae import SSVAE

    torch.manual_seed(0)
    model, guide = SSVAE(x_dim=12, z_dim=3, hidden=(8,)), SSVAEGuide(x_dim=12, z_dim=3, hidden=(8,), aux_weight=7.0)
    x, y = torch.rand(5, 12).round(), torch.tensor([0, 3, 9, 3, 1])

    def loss(train: bool) -> float:
        guide.train(train)
        pyro.set_rng_seed(1)
        return float(TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, x, y))

    ce = torch.nn.functional.cross_entropy(guide.classifier(x), y, reduction="sum")
    assert loss(True) - loss(False) == pytest.approx(7.0 * float(ce), rel=1e-5)
    guide.eval()
    assert "y_aux" not in pyro.poutine.trace(guide).get_trace(x, y).nodes


def test_z_encoder_without_the_concatenation_equals_the_concatenated_one():
    """q(z|x,y)'s first layer is split as W_x x + W_y[:, y] + b: the same numbers as the
    encoder applied to [x, onehot(y)], for observed labels and for enumerated ones (10, 1)."""
    from pyro_vae.guides.ssvae import SSVAEGuide

    torch.manual_seed(0)
    guide = SSVAEGuide(x_dim=12, z_dim=3, hidden=(8, 6))
    x = torch.rand(5, 12)
    for y in (torch.tensor([0, 3, 9, 3, 1]), torch.arange(10).reshape(10, 1)):
        onehot = torch.nn.functional.one_hot(y, 10).float()
        shape = torch.broadcast_shapes(x.shape[:-1], onehot.shape[:-1])
        want = guide.z_encoder(torch.cat([x.expand(*shape, -1), onehot.expand(*shape, -1)], -1))
        got = guide.z_encoder.forward_with_label(x, y, 10)
        for a, b in zip(got, want):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
