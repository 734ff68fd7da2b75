"""The VQ-VAE (issue 17): gradients, codebook updates, restarts, k-means init, estimators, PixelCNN masks, DDP."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pyro_vae.errors import ConfigError
from pyro_vae.guides.vqvae import VQGuide
from pyro_vae.models.vqvae import VQVAE
from pyro_vae.objectives import Objective, make_estimator
from pyro_vae.vq import Codebook, kmeans, rotation_trick


def pair(**options):
    torch.manual_seed(0)
    model = VQVAE(x_dim=784, image_shape=(1, 28, 28), num_codes=16, code_dim=8, **options)
    return model, VQGuide(model, x_dim=784)


def images(n=8, seed=0):
    return torch.bernoulli(torch.rand(n, 784, generator=torch.Generator().manual_seed(seed)) * 0.3)


@pytest.mark.parametrize("gradient", ["straight-through", "rotation"])
def test_gradient_reaches_the_encoder(gradient):
    model, guide = pair()
    guide.gradient = gradient
    guide.commitment = 0.0  # only the reconstruction's path: through the quantizer
    loss = Objective(model, guide, make_estimator("elbo"))(images())
    loss.backward()
    grad = guide.encoder.conv[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 1e-6


def test_straight_through_and_rotation_values_and_gradients():
    z_e = torch.randn(5, 3, requires_grad=True)
    z_q = torch.randn(5, 3)
    st = z_e + (z_q - z_e).detach()
    rot = rotation_trick(z_e, z_q)
    assert torch.allclose(st, z_q, atol=1e-6) and torch.allclose(rot, z_q, atol=1e-5)
    g = torch.randn(5, 3)
    (gz,) = torch.autograd.grad((st * g).sum(), z_e)
    assert torch.allclose(gz, g)  # the identity
    (gr,) = torch.autograd.grad((rot * g).sum(), z_e)
    # the rotation's gradient is (lambda R)^T g: the same norm ratio |z_q|/|z_e| on every row
    ratio = z_q.norm(dim=1) / z_e.detach().norm(dim=1)
    assert torch.allclose(gr.norm(dim=1), ratio * g.norm(dim=1), rtol=1e-4)


def test_one_ema_update_equals_a_hand_computation():
    book = Codebook(num_codes=3, code_dim=2, decay=0.9, eps=1e-5, restart_threshold=0.0, kmeans_init=False)
    book.embed.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]))
    book.ema_count.copy_(torch.tensor([2.0, 1.0, 3.0]))
    book.ema_sum.copy_(book.embed * book.ema_count[:, None])
    z = torch.tensor([[0.1, -0.1], [0.9, 1.2], [1.1, 0.8], [0.2, 0.0]])
    book._step(z)  # codes 0, 1, 1, 0; code 2 unused
    n = torch.tensor([2.0, 2.0, 0.0])
    s = torch.tensor([[0.3, -0.1], [2.0, 2.0], [0.0, 0.0]])
    count = 0.9 * torch.tensor([2.0, 1.0, 3.0]) + 0.1 * n
    total = count.sum()
    summed = 0.9 * torch.tensor([[0.0, 0.0], [1.0, 1.0], [15.0, 15.0]]) + 0.1 * s
    smoothed = (count + 1e-5) / (total + 3e-5) * total
    assert torch.allclose(book.ema_count, count)
    assert torch.allclose(book.embed, summed / smoothed[:, None], atol=1e-6)
    assert book.epoch_counts.tolist() == [2.0, 2.0, 0.0]


def test_dead_codes_are_reseeded_from_the_batch():
    book = Codebook(num_codes=4, code_dim=2, decay=0.99, restart_threshold=1.0, kmeans_init=False)
    book.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [20.0, 20.0], [30.0, 30.0]]))
    book.ema_count.copy_(torch.tensor([50.0, 1.005, 0.5, 50.0]))  # code 1 falls below 1 when unused, 2 already is
    book.ema_sum.copy_(book.embed * book.ema_count[:, None])
    z = torch.randn(64, 2) * 0.1  # all near code 0
    book._step(z)
    assert int(book.epoch_restarts) == 2
    for k in (1, 2):
        assert (book.embed[k] - z).norm(dim=1).min() < 1e-6  # placed on an encoder output of the batch
        assert book.ema_count[k] == 2.0
    assert torch.allclose(book.embed[3], torch.tensor([30.0, 30.0]), atol=1e-3)  # alive codes are kept (smoothing aside)
    assert book.epoch_stats()["codebook_restarts"] == 2


def test_kmeans_init_places_codes_on_the_data():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [0.0, -4.0]])
    z = (centres[:, None] + 0.05 * torch.randn(4, 250, 2, generator=g)).reshape(-1, 2)
    book = Codebook(num_codes=4, code_dim=2, restart_threshold=0.0, kmeans_init=True)
    book._step(z)
    found = book.embed[torch.cdist(centres, book.embed).argmin(1)]
    assert torch.allclose(found, centres, atol=0.02)
    assert sorted(torch.cdist(centres, book.embed).argmin(1).tolist()) == [0, 1, 2, 3]
    _, counts = kmeans(z, 4, 10, torch.Generator().manual_seed(0))
    assert counts.tolist() == [250.0] * 4


def test_bound_estimators_and_metrics():
    model, guide = pair()
    x = images(16)
    rate = 49 * math.log(16)
    assert model.rate == pytest.approx(rate)
    for name in ("elbo", "meanfield"):
        objective = Objective(model, guide, make_estimator(name)).eval()
        with torch.no_grad():
            loss = float(objective(x))
            codes = guide.encode_codes(x)
            recon = float(-model.decode_codes(codes).log_prob(x).mean())
        assert loss == pytest.approx(recon + rate, rel=1e-5)  # -ELBO = -log p(x|z_q) + HW log K
    for name in ("iwae", "dreg", "stl"):
        with pytest.raises(ConfigError, match="elbo or meanfield"):
            Objective(model, guide, make_estimator(name, particles=4))
    # training mode: the commitment loss joins the loss, and the codebook counts the step
    objective = Objective(model, guide, make_estimator("meanfield")).train()
    objective(x).backward()
    stats = model.epoch_metrics({"test_loss": recon + rate})
    assert bool(model.codebook.initialized) and 0 < stats["codebook_usage"] <= 1
    assert 1 <= stats["perplexity"] <= 16 and stats["commitment_loss"] > 0
    assert stats["reconstruction_loss"] == pytest.approx(recon)
    assert model.codebook.epoch_counts.sum() == 0  # reset for the next epoch


def test_forward_only_traces_leave_the_codebook_alone():
    model, guide = pair()
    before = model.codebook.embed.clone()
    with torch.no_grad():
        Objective(model, guide, make_estimator("elbo")).train()(images())
    loss = Objective(model, guide, make_estimator("elbo")).train()(images())  # no backward
    del loss
    assert torch.equal(model.codebook.embed, before) and int(model.codebook.steps) == 0


def test_guide_needs_the_vq_model():
    from pyro_vae.models import VAE

    with pytest.raises(ConfigError, match="--model vqvae"):
        VQGuide(VAE(), x_dim=784)


@pytest.mark.parametrize("kind", ["A", "B"])
def test_masked_conv_sees_only_earlier_positions(kind):
    from pyro_vae.pixelcnn import MaskedConv2d

    conv = MaskedConv2d(1, 1, 5, kind)
    mask = conv.mask[0, 0]
    assert mask[2, 2] == (1 if kind == "B" else 0)
    assert mask[2, 3:].sum() == 0 and mask[3:].sum() == 0 and mask[:2].sum() == 10 and mask[2, :2].sum() == 2


def test_pixelcnn_never_sees_its_own_or_later_positions():
    from pyro_vae.pixelcnn import PixelCNNNet

    torch.manual_seed(0)
    net = PixelCNNNet(num_codes=6, hidden=16, blocks=3)
    h = w = 7
    for i, j in [(0, 0), (3, 4), (6, 6), (2, 0)]:
        e = torch.randn(1, 16, h, w, requires_grad=True)
        net.logits_from_embedding(e)[0, :, i, j].sum().backward()
        seen = e.grad[0].abs().sum(0) > 0
        order = torch.arange(h * w).reshape(h, w)
        assert not seen[order >= i * w + j].any()  # itself and every later position: no influence
        if (i, j) != (0, 0):
            assert seen[order < i * w + j].any()  # and it does see something earlier


def test_pixelcnn_prior_fits_and_samples():
    from pyro_vae.pixelcnn import PixelCNNPrior
    from pyro_vae.second_stage import Latents

    # codes with a rule: each row constant, rows alternating 0/1 from a random start
    g = torch.Generator().manual_seed(0)
    start = torch.randint(2, (256, 1, 1), generator=g)
    codes = ((start + torch.arange(4)[None, :, None]) % 2).expand(256, 4, 4).contiguous()
    prior = PixelCNNPrior([4, 4], num_codes=4, hidden=16, blocks=2, train_steps=300, batch_size=64, lr=3e-3)
    info = prior.fit(Latents(codes=codes))
    assert info["train_nll"] < 0.3 * 16 * math.log(4)  # far below the uniform prior's 16 log 4 nats (log 2 is the floor)
    draws = prior.sample(8, torch.Generator().manual_seed(1))
    assert draws.shape == (8, 4, 4) and ((draws[:, 1:] + draws[:, :-1]) == 1).float().mean() > 0.9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _codebook_steps(batches) -> dict:
    book = Codebook(num_codes=8, code_dim=3, decay=0.7, restart_threshold=0.5, kmeans_init=True)
    for z in batches:
        book._step(z)
    return {k: v.clone() for k, v in book.state_dict().items()}


def _global_batches():
    g = torch.Generator().manual_seed(3)
    # the first batch fills every code; later ones leave codes 3 clusters to die and be re-seeded
    first = torch.randn(40, 3, generator=g) * 3
    later = [torch.randn(40, 3, generator=g) * 0.2 + torch.tensor([2.0, 0.0, 0.0]) for _ in range(12)]
    return [first, *later]


def _rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        state = _codebook_steps([z.tensor_split(2)[rank] for z in _global_batches()])
        torch.save(state, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_hold_the_codebook_of_one(tmp_path):
    one = _codebook_steps(_global_batches())
    assert int(one["epoch_restarts"]) > 0  # the test exercises restarts, not only EMA updates
    mp.spawn(_rank, args=(_free_port(), str(tmp_path / "book")), nprocs=2, join=True)
    for rank in (0, 1):
        two = torch.load(f"{tmp_path / 'book'}.{rank}", weights_only=True)
        for key, value in one.items():
            assert torch.allclose(two[key].double(), value.double(), atol=1e-5), (rank, key)


def test_a_vq_run_trains_encodes_fits_a_pixelcnn_and_evaluates(tmp_path):
    import json

    import numpy as np

    from pyro_vae.config import TrainConfig
    from pyro_vae.evaluation import evaluate_run
    from pyro_vae.latents import encode_run
    from pyro_vae.second_stage import PriorError, fit_prior_run, open_prior, sample_latents
    from pyro_vae.training import train

    g = np.random.default_rng(0)
    x = (g.random((240, 784)) < np.linspace(0.05, 0.6, 784)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run = tmp_path / "run"
    config = TrainConfig.from_dict(dict(model="vqvae", guide="vqvae", dataset=str(tmp_path / "x.npy"),
                                        image_shape=[1, 28, 28], epochs=2, batch_size=50, estimator="elbo",
                                        model_options={"num_codes": 16, "code_dim": 4}))
    train(config, run, quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert 0 < row["codebook_usage"] <= 1 and 1 <= row["perplexity"] <= 16
        assert row["reconstruction_loss"] == pytest.approx(row["test_loss"] - 49 * math.log(16))
    with pytest.raises(ConfigError, match="elbo or meanfield"):
        train(TrainConfig.from_dict({**config.to_dict(), "estimator": "iwae"}), tmp_path / "iw", quiet=True)
    encoded = encode_run(run, device="cpu")
    assert encoded["kind"] == "codes" and encoded["train"]["codes"].shape == (216, 7, 7)
    assert encoded["train"]["codes"].max() < 16
    with pytest.raises(PriorError, match="--kind pixelcnn"):
        fit_prior_run(run, "gmm", device="cpu")
    fit_prior_run(run, "pixelcnn", {"train_steps": 30, "hidden": 16, "blocks": 1}, device="cpu")
    prior, record = open_prior(run, "pixelcnn")
    codes = sample_latents(prior, record, 4)
    assert codes.dtype == torch.long and codes.shape == (4, 7, 7)
    r = evaluate_run(run, device="cpu")
    assert r["test_nll_bound_uniform"] == pytest.approx(r["test_reconstruction_nll"] + 49 * math.log(16))
    assert r["test_nll_bound_pixelcnn"] == pytest.approx(r["test_reconstruction_nll"] + r["rate_pixelcnn"])
    assert r["rate_pixelcnn"] < 49 * math.log(16)  # 30 steps already beat the uniform prior
    assert r["test_bits_per_dim_bound_uniform"] == pytest.approx(r["test_nll_bound_uniform"] / (784 * math.log(2)))


def test_codebook_loss_mode_trains_the_codes_by_gradient():
    model, guide = pair(update="loss")
    assert model.codebook.embed.requires_grad
    objective = Objective(model, guide, make_estimator("elbo")).train()
    objective(images()).backward()
    grad = model.codebook.embed.grad
    assert grad is not None and grad.abs().sum() > 0  # ||sg(z_e) - z_q||^2 reaches the chosen codes
    used = torch.unique(guide.encode_codes(images()))
    unused = torch.ones(16, dtype=torch.bool)
    unused[used] = False
    assert grad[unused].abs().sum() == 0


def test_resume_continues_a_vq_run_bitwise(tmp_path):
    import numpy as np

    from pyro_vae.config import TrainConfig
    from pyro_vae.run import load_checkpoint
    from pyro_vae.training import train

    g = np.random.default_rng(1)
    np.save(tmp_path / "x.npy", (g.random((150, 784)) < 0.3).astype(np.float32))
    base = dict(model="vqvae", guide="vqvae", dataset=str(tmp_path / "x.npy"), image_shape=[1, 28, 28],
                batch_size=50, estimator="elbo", model_options={"num_codes": 16, "code_dim": 4, "decay": 0.5})
    train(TrainConfig.from_dict({**base, "epochs": 3}), tmp_path / "whole", quiet=True)
    train(TrainConfig.from_dict({**base, "epochs": 2}), tmp_path / "parts", quiet=True)
    train(TrainConfig.from_dict({**base, "epochs": 3}), tmp_path / "parts", resume=True, quiet=True)
    whole, parts = load_checkpoint(tmp_path / "whole", "cpu"), load_checkpoint(tmp_path / "parts", "cpu")
    assert int(whole["model"]["codebook.steps"]) == 3 * 3
    for key, value in whole["model"].items():
        assert torch.equal(value, parts["model"][key]), key
    for key, value in whole["guide"].items():
        assert torch.equal(value, parts["guide"][key]), key
