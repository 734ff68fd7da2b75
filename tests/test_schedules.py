"""KL schedules: beta warm-up and cycles, capacity annealing, free bits (exact gradients), and
their effect on real MNIST."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO

from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.guides import GaussianGuide
from pyro_vae.models import VAE
from pyro_vae.objectives import KLPenaltyObjective, kl_per_dimension, make_estimator
from pyro_vae.objectives.kl_penalty import KLNotAvailableError
from pyro_vae.run import load_run, read_metrics
from pyro_vae.schedules import KLSchedule
from pyro_vae.training import train


def test_cyclical_schedule_follows_fu_et_al():
    s = KLSchedule(beta=2.0, cycle_epochs=4, cycle_ratio=0.5)
    assert [s(t) for t in (0, 1, 2, 3, 4, 4.5, 5, 6.5, 8)] == [0, 1, 2, 2, 2, 0.5, 1, 2, 2]
    assert s.weights(1) == {"beta": 1.0}


def test_warmup_capacity_and_free_bits_weights():
    assert KLSchedule(beta=4.0, warmup_epochs=2)(1) == 2.0
    c = KLSchedule(capacity=25.0, capacity_epochs=10)
    assert c.weights(4) == {"capacity": 10.0} and c.capacity_at(20) == 25.0
    assert KLSchedule(free_bits=0.5).weights(0) == {"beta": 1.0, "free_bits": 0.5}
    with pytest.raises(ValueError, match="not both"):
        KLSchedule(warmup_epochs=2, cycle_epochs=4)


def _zero_decoder_pair():
    """A VAE whose decoder ignores z (first layer zero), and a guide with KL_j large for j < 3."""
    torch.manual_seed(0)
    model, guide = VAE(x_dim=6, z_dim=6, hidden=[5]), GaussianGuide(x_dim=6, z_dim=6, hidden=[5])
    with torch.no_grad():
        model.decoder[0].weight.zero_()
        out = guide.encoder.body.out_layer
        out.weight.mul_(0.01)
        out.bias.zero_()
        out.bias[:3] = 2.0  # loc 2 in the first three dims: KL_j ~ 2 nats; the rest ~ 0
    return model, guide


def test_free_bits_never_push_a_dimension_below_lambda():
    model, guide = _zero_decoder_pair()
    x = torch.rand(50, 6).round()
    objective = KLPenaltyObjective(model, guide, make_estimator("meanfield"))
    kl = kl_per_dimension(model, guide, x)
    assert (kl[:3] > 1.5).all() and (kl[3:] < 0.1).all()
    objective(x, free_bits=0.5).backward()
    grad = guide.encoder.body.out_layer.bias.grad  # (loc_1..6, log_scale_1..6)
    below = torch.tensor([False] * 3 + [True] * 3).repeat(2)
    assert torch.all(grad[below] == 0)  # the KL term leaves dimensions under lambda alone
    assert torch.all(grad[:3] > 0.5)  # and pulls the others' means toward the prior
    guide.zero_grad()
    objective(x).backward()  # without free bits every dimension is pulled
    assert torch.all(guide.encoder.body.out_layer.bias.grad[3:6].abs() > 0)


def test_penalties_need_an_elbo_estimator_and_a_factorized_kl():
    model, guide = _zero_decoder_pair()
    with pytest.raises(KLNotAvailableError, match="elbo or meanfield"):
        KLPenaltyObjective(model, guide, RenyiELBO(alpha=0.5))

    class FullCovariancePrior(VAE):
        def prior(self, batch_shape=()):
            return dist.MultivariateNormal(torch.zeros(self.z_dim), torch.eye(self.z_dim)).expand(batch_shape)

    objective = KLPenaltyObjective(FullCovariancePrior(6, 6, [5]), guide, make_estimator("elbo"))
    x = torch.rand(4, 6).round()
    with pytest.raises(KLNotAvailableError, match="do not factorize"):
        objective(x, free_bits=0.5)
    assert torch.isfinite(objective(x, capacity=1.0))  # the total KL still works


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("binarized-mnist", "cpu", train_size=2000, test_size=500)


def _run(tmp_path, mnist, name, **kw):
    pyro.set_rng_seed(0)
    config = TrainConfig.from_dict(dict(preset="seed", epochs=3, seed=0, device="cpu", **kw))
    train(config, tmp_path / name, quiet=True, dataset=mnist)
    _, model, guide = load_run(tmp_path / name)
    return kl_per_dimension(model, guide, mnist.test), read_metrics(tmp_path / name)


def test_beta_above_one_lowers_the_kl_on_mnist(tmp_path, mnist):
    kl1, _ = _run(tmp_path, mnist, "b1", beta=1.0)
    kl4, rows = _run(tmp_path, mnist, "b4", beta=4.0)
    assert rows[-1]["beta"] == 4.0
    assert kl4.sum() < 0.8 * kl1.sum()


def test_capacity_holds_the_kl_near_c_on_mnist(tmp_path, mnist):
    kl, rows = _run(tmp_path, mnist, "cap", capacity=6.0, capacity_epochs=1, gamma=30.0)
    assert [r["capacity"] for r in rows] == [6.0, 6.0, 6.0]
    assert abs(float(kl.sum()) - 6.0) < 1.5


def test_cyclical_beta_is_logged_on_mnist(tmp_path, mnist):
    _, rows = _run(tmp_path, mnist, "cyc", cycle_epochs=2, cycle_ratio=0.5)
    assert [r["beta"] for r in rows] == [1.0, 1.0, 1.0]  # logged at each epoch's last step


def test_free_bits_keep_every_dimension_above_lambda_on_mnist(tmp_path, mnist):
    kl0, _ = _run(tmp_path, mnist, "fb0", z_dim=20)
    kl, rows = _run(tmp_path, mnist, "fb", z_dim=20, free_bits=0.25, estimator="meanfield")
    assert rows[-1]["free_bits"] == 0.25
    assert int((kl < 0.25).sum()) < int((kl0 < 0.25).sum())
