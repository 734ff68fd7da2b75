"""The benchmarks' yardstick: with the same weights and the same random draws, the toolkit's
estimators compute the hand-written PyTorch losses of benchmarks/reference_torch.py, and the same
gradients (so overhead.py times the same arithmetic on both sides)."""

import sys
from pathlib import Path

import pyro
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from reference_torch import make_loss, plain_from_toolkit  # noqa: E402

from pyro_vae.config import TrainConfig, build_model_and_guide  # noqa: E402
from pyro_vae.objectives import Objective, make_estimator, parse_spec  # noqa: E402


@pytest.mark.parametrize("preset", ["seed", "iwae1"])
@pytest.mark.parametrize("spec", ["elbo", "meanfield", "iwae:K=5", "dreg:K=5"])
def test_toolkit_and_hand_written_losses_agree(preset, spec):
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((32, 784), 0.3))
    config = TrainConfig.from_dict(dict(preset=preset, estimator=spec, x_dim=784))
    pyro.set_rng_seed(0)
    model, guide = build_model_and_guide(config, x.mean(0))
    net = plain_from_toolkit(model, guide, config.activation)
    name, opts = parse_spec(spec)

    torch.manual_seed(1)
    toolkit = Objective(model, guide, make_estimator(spec))(x)
    torch.manual_seed(1)
    plain = make_loss(name, opts.get("K", 1))(net, x)
    if name != "dreg":  # DReG's surrogate differs in value; its gradient is what must agree
        assert float(toolkit) == pytest.approx(float(plain), rel=1e-6)
    toolkit.backward()
    plain.backward()
    pairs = [*zip(guide.encoder.body.parameters(), net.encoder.parameters()),
             *zip(model.decoder.parameters(), net.decoder.parameters())]
    for a, b in pairs:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)  # float32 sums reordered
