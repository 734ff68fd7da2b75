"""The two-stochastic-layer model and guide (hvae2): sizes, pairing, every estimator, evaluation."""

import pytest
import torch

from pyro_vae.config import PRESETS, TrainConfig, build_model_and_guide
from pyro_vae.evaluation import active_units, evaluate, mutual_information
from pyro_vae.objectives import ESTIMATORS, Objective, check_pair, log_weights, make_estimator


@pytest.fixture
def pair():
    torch.manual_seed(0)
    config = TrainConfig.from_dict({"preset": "iwae2", "x_dim": 784})
    model, guide = build_model_and_guide(config, torch.full((784,), 0.2))
    x = torch.bernoulli(torch.full((6, 784), 0.2))
    return model, guide, x


def test_burda_sizes_and_pairing(pair):
    model, guide, x = pair
    assert PRESETS["iwae2"]["model"] == "hvae2" and PRESETS["iwae2"]["guide"] == "hvae2"
    check_pair(model, guide, x)
    # x -> 200 -> 200 -> z1 (100) -> 100 -> 100 -> z2 (50), and back
    assert [m.out_features for m in guide.encoder1.body if hasattr(m, "out_features")] == [200, 200, 200]
    assert [m.out_features for m in guide.encoder2.body if hasattr(m, "out_features")] == [100, 100, 100]
    assert [m.out_features for m in model.z1_net.body if hasattr(m, "out_features")] == [100, 100, 200]
    assert [m.out_features for m in model.decoder if hasattr(m, "out_features")] == [200, 200, 784]
    assert isinstance(model.decoder[1], torch.nn.Tanh)
    assert model.sample(3).shape == (3, 784)
    assert guide.posterior(x).event_shape == (100,)


def test_log_weights_shape_and_bound_order(pair):
    model, guide, x = pair
    lw = log_weights(model, guide, x, 7)
    assert lw.shape == (7, 6) and torch.isfinite(lw).all()
    r1 = evaluate(model, guide, x, k=1, seed=0)
    r = evaluate(model, guide, x, k=500, seed=0)
    assert r["test_elbo"] <= r["test_log_likelihood"]
    assert r1["test_log_likelihood"] < r["test_log_likelihood"]  # L_1 < L_500 here by a wide margin
    # p(z2) has no parents: closed form; p(z1|z2) depends on z2, which the guide draws after
    # z1: Monte Carlo from the weights' own particles
    assert r["kl_method"] == {"z1": "monte carlo (its prior may depend on 'z2', which the guide "
                                    "draws after it)", "z2": "closed form"}
    assert len(r["kl_per_dim"]["z1"]) == 100 and len(r["kl_per_dim"]["z2"]) == 50
    # ELBO = -distortion - rate up to z2's Monte Carlo noise over 6 x 500 draws (-397.927 vs
    # -397.941 here; exactly equal when z2's KL was Monte Carlo too)
    assert r["test_elbo"] == pytest.approx(-r["distortion"] - r["rate"], abs=0.05)
    assert sum(r["kl_per_dim"]["z1"]) == pytest.approx(r["kl_per_site"]["z1"], rel=1e-4)
    assert sum(r["kl_per_dim"]["z2"]) == pytest.approx(r["kl_per_site"]["z2"], rel=1e-4)


@pytest.mark.parametrize("name", [n for n in ("elbo", "meanfield", "iwae", "stl", "dreg", "miwae",
                                              "ciwae", "piwae", "renyi") if n in ESTIMATORS])
def test_every_estimator_trains_hvae2(pair, name):
    model, guide, x = pair
    objective = Objective(model, guide, make_estimator(name, particles=3))
    loss = objective(x)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in guide.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_active_units_and_mi_cover_both_layers(pair):
    model, guide, x = pair
    x = torch.bernoulli(torch.rand(50, 784))
    count, var = active_units(guide, x)
    assert var.shape == (150,)  # z1 (100) then z2 (50)
    assert count == int((var > 0.01).sum())
    assert 0.0 <= mutual_information(guide, x) <= torch.log(torch.tensor(50.0)) + 1e-6
