"""Conv encoder/decoder (28x28 and 32x32, any channels), the laplace and discretized logistic
likelihoods, image-folder data, on real MNIST."""

import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.config import TrainConfig, build_model_and_guide
from pyro_vae.data import load_dataset
from pyro_vae.evaluation import evaluate
from pyro_vae.likelihoods import DataError, DiscretizedLogisticDistribution, make_likelihood
from pyro_vae.nets import ConvEncoder, decoder_net
from pyro_vae.run import load_run
from pyro_vae.training import train


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (2, 32, 32)])
def test_conv_nets_map_images_of_any_channel_count(shape):
    d = int(np.prod(shape))
    enc = ConvEncoder(shape, 10, [64])
    assert enc(torch.rand(5, d)).shape == (5, 10)
    dec = decoder_net("conv", 8, 2 * d, [64], "relu", shape)  # two parameters per feature
    assert dec(torch.randn(3, 5, 8)).shape == (3, 5, 2 * d)  # particle and batch dims kept
    with pytest.raises(ValueError, match="multiples of 4"):
        ConvEncoder((1, 30, 30), 10)


def test_conv4_is_disentanglement_libs_conv_net_for_64x64_images():
    """Locatello et al. 2019 (disentanglement_lib's conv_encoder / deconv_decoder): four stride-2
    4x4 convolutions with 32, 32, 64, 64 channels down to a 4x4 grid, a dense layer of 256, and the
    decoder the mirror image."""
    enc = ConvEncoder((1, 64, 64), 20, [256], net="conv4")
    assert [m.out_channels for m in enc.conv if isinstance(m, torch.nn.Conv2d)] == [32, 32, 64, 64]
    assert [m.in_features for m in enc.head if isinstance(m, torch.nn.Linear)] == [64 * 4 * 4, 256]
    assert enc(torch.rand(2, 3, 4096)).shape == (2, 3, 20)
    dec = decoder_net("conv4", 10, 4096, [256], "relu", (1, 64, 64))
    assert [m.out_channels for m in dec.deconv if isinstance(m, torch.nn.ConvTranspose2d)] == [64, 32, 32, 1]
    assert dec(torch.randn(5, 10)).shape == (5, 4096)
    with pytest.raises(ValueError, match="conv4 halves the image 4 times.*multiples of 16"):
        ConvEncoder((1, 28, 28), 10, net="conv4")


def test_discretized_logistic_is_a_pmf_on_the_8_bit_grid():
    d = DiscretizedLogisticDistribution(torch.tensor([0.3, 0.0, 1.2, 0.5]), torch.tensor([0.1, 0.01, 0.5, 1e-3]))
    grid = torch.arange(256.0)[:, None] / 255
    assert torch.allclose(d.log_prob(grid).exp().sum(0), torch.ones(4), atol=1e-5)
    s = d.sample((100,))
    assert torch.equal(s, torch.round(s * 255) / 255) and s.min() >= 0 and s.max() <= 1
    lik = make_likelihood("discretized-logistic", 4)
    with pytest.raises(DataError, match="8-bit"):
        lik.check_support(torch.tensor([[0.5, 0.0, 1.0, 0.2]]))


def test_laplace_likelihood_is_the_laplace_density():
    lik = make_likelihood("laplace", 3)
    h, x = torch.randn(2, 3), torch.randn(2, 3)
    expected = dist.Laplace(h, 0.1).log_prob(x).sum(-1)
    assert torch.allclose(lik(h).log_prob(x), expected, atol=1e-5)


def test_conv_vae_with_discretized_logistic_on_mnist_beats_8_bits_per_dim(tmp_path):
    data = load_dataset("mnist", "cpu", train_size=2000, test_size=200)
    config = TrainConfig.from_dict(dict(net="conv", likelihood="discretized-logistic", z_dim=16, hidden=[128],
                                        init_output_bias=True, epochs=2, seed=0, device="cpu"))
    train(config, tmp_path / "run", quiet=True, dataset=data)
    _, model, guide = load_run(tmp_path / "run")
    r = evaluate(model, guide, data.test, k=20)
    torch.manual_seed(0)
    untrained = evaluate(*build_model_and_guide(config, data.train_mean()), data.test, k=20)
    # a uniform pmf over 256 levels is 8 bits/dim; two epochs on 2000 images take it below 2.5
    assert r["test_bits_per_dim"] < 2.5 and r["test_bits_per_dim"] < 0.6 * untrained["test_bits_per_dim"]
    assert r["test_bits_per_dim"] == pytest.approx(r["test_nll"] / (784 * math.log(2)))


def test_image_folder_trains_with_conv_nets(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(10):
            img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "imgs" / cls / f"{i}.png")
    config = TrainConfig.from_dict(dict(dataset=str(tmp_path / "imgs"), net="conv", likelihood="laplace",
                                        z_dim=4, hidden=[32], epochs=1, batch_size=6, device="cpu"))
    rows = train(config, tmp_path / "run", quiet=True)
    assert config.image_shape == [3, 32, 32] and math.isfinite(rows[-1]["test_loss"])
    _, model, _ = load_run(tmp_path / "run")
    assert model.sample(2).shape == (2, 3 * 32 * 32)
