"""--amp bf16: weight layers in bfloat16, densities and the loss in float32."""

import pytest
import torch

from pyro_vae.amp import amp_dtype, autocast_layers
from pyro_vae.config import TrainConfig, build_model_and_guide
from pyro_vae.objectives import make_estimator, make_objective
from pyro_vae.training import train


def _pair(seed=0):
    torch.manual_seed(seed)
    config = TrainConfig.from_dict(dict(preset="iwae1"))
    config.x_dim = 784
    return build_model_and_guide(config, torch.full((784,), 0.3))


def test_layers_compute_in_bfloat16_and_hand_on_float32():
    model, guide = _pair()
    x = torch.rand(8, 784)
    exact = guide.encoder(x)
    handles = autocast_layers(guide, "cpu", torch.bfloat16)
    low = guide.encoder(x)
    assert low[0].dtype == torch.float32 and low[1].dtype == torch.float32
    assert not torch.equal(low[0], exact[0])  # the products really ran in bfloat16
    torch.testing.assert_close(low[0], exact[0], atol=0.05, rtol=0.05)
    for h in handles:
        h.remove()
    assert torch.equal(guide.encoder(x)[0], exact[0])
    assert not torch.is_autocast_enabled("cpu")  # the scope closed behind each layer


@pytest.mark.parametrize("spec", ["elbo", "meanfield", "iwae:K=10"])
def test_bf16_loss_is_float32_and_close_to_the_float32_loss(spec):
    model, guide = _pair()
    x = torch.bernoulli(torch.full((64, 784), 0.3))
    objective = make_objective(model, guide, make_estimator(spec))
    torch.manual_seed(1)
    exact = objective(x)
    for module in (model, guide):
        autocast_layers(module, "cpu", torch.bfloat16)
    torch.manual_seed(1)
    low = objective(x)
    low.backward()
    assert low.dtype == torch.float32
    assert abs((low - exact).item()) < 0.005 * abs(exact.item())  # same noise: only rounding in the products
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in objective.parameters())


def test_train_with_amp_bf16_and_jit_ends_where_float32_does(tmp_path, small_mnist):
    losses = {}
    for amp in (None, "bf16"):
        config = TrainConfig.from_dict(dict(preset="iwae1", epochs=2, batch_size=100, amp=amp, jit=True, device="cpu"))
        losses[amp] = train(config, tmp_path / str(amp), quiet=True, dataset=small_mnist)[-1]["test_loss"]
    assert abs(losses["bf16"] - losses[None]) < 0.25, losses  # same seed and data (measured 0.02); nats per image


def test_unknown_amp_names_the_choices():
    with pytest.raises(ValueError, match="choose bf16"):
        amp_dtype("fp8")
