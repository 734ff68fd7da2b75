"""Latents for downstream models (encode/decode in the diffusers convention) and second-stage
priors on them (gmm, diffusion): round trips, the scaling factor's definition, a diffusion model
that learns a known mixture, files that load with weights_only=True, and one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_vae
from pyro_vae.applications import reconstruct
from pyro_vae.cli import main
from pyro_vae.config import TrainConfig
from pyro_vae.guides import GaussianGuide, HierarchicalGuide, IAFGuide
from pyro_vae.latents import aggregate_statistics, decode, encode, latent_layout
from pyro_vae.models import VAE, HierarchicalVAE
from pyro_vae.second_stage import (
    DiffusionPrior,
    GaussianMixturePrior,
    Latents,
    PriorError,
    load_prior,
    save_prior,
)
from pyro_vae.training import train

PROGRAMS = Path(__file__).resolve().parent / "programs"


def cli(*args) -> int:
    return main([str(a) for a in args])


def _pair(kind: str):
    torch.manual_seed(0)
    if kind == "vae":
        return VAE(x_dim=12, z_dim=3, hidden=[16]), GaussianGuide(x_dim=12, z_dim=3, hidden=[16])
    if kind == "hvae2":
        return (HierarchicalVAE(x_dim=12, z_dim=3, z1_dim=4, hidden=[16], hidden2=[8]),
                HierarchicalGuide(x_dim=12, z_dim=3, z1_dim=4, hidden=[16], hidden2=[8]))
    if kind == "iaf":
        return VAE(x_dim=12, z_dim=3, hidden=[16]), IAFGuide(x_dim=12, z_dim=3, hidden=[16])
    sys.path.insert(0, str(PROGRAMS))
    try:
        import functional
    finally:
        sys.path.remove(str(PROGRAMS))
    return functional.model, functional.guide


@pytest.mark.parametrize("kind", ["vae", "hvae2", "iaf", "functional"])
def test_encode_then_decode_equals_reconstruct(kind):
    model, guide = _pair(kind)
    x_dim = 2 if kind == "functional" else 12
    x = torch.bernoulli(torch.full((30, x_dim), 0.3)) if x_dim == 12 else torch.randn(30, 2)
    q = encode(model, guide, x, chunk=7).latent_dist  # chunks of rows give the same numbers
    layout = latent_layout(model, guide, x)
    z_dim = 4 if kind == "hvae2" else (2 if kind == "functional" else 3)  # hvae2: z1, the site decode takes
    assert q.mean.shape == q.std.shape == (30, z_dim) and layout.shape == (z_dim,)
    assert torch.allclose(decode(model, q.mode(), x, layout).sample, reconstruct(model, guide, x), atol=1e-6)
    if kind in ("vae", "hvae2"):
        assert q.exact and torch.allclose(q.std, guide.posterior(x).base_dist.scale)
    if kind == "functional":  # the trace path: the scale of the guide's Normal
        import functional

        assert q.exact and torch.allclose(q.std, functional.encoder(x).chunk(2, -1)[1].exp(), atol=1e-6)
    if kind == "iaf":  # a flow: moment-matched from draws, and said so
        assert not q.exact and (q.std > 0).all()
    if kind == "functional":
        with pytest.raises(ValueError, match="needs the latent sites"):
            decode(model, q.mode(), x)
    kl = q.kl()
    assert kl.shape == (30,) and (kl >= 0).all()


def test_scaling_factor_matches_its_definition():
    # 1 / sd of the training latents z ~ q(z|x) (latent diffusion's scale_factor), every element
    # pooled: the closed form of aggregate_statistics against 40 draws per row
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2000, 6, generator=g) * torch.tensor([3.0, 1.0, 0.5, 0.1, 0.0, 2.0]) + 1.5
    std = torch.rand(2000, 6, generator=g) * 0.8 + 0.1
    stats = aggregate_statistics(mean, std)
    draws = mean + std * torch.randn(40, *mean.shape, generator=g)
    assert stats["scaling_factor"] == pytest.approx(1 / float(draws.std()), rel=5e-3)
    assert torch.allclose(stats["latent_std"], draws.reshape(-1, 6).std(0), rtol=1e-2)
    assert torch.allclose(stats["latent_mean"], mean.mean(0))
    # with zero scales it is 1 / the population sd of the means
    assert aggregate_statistics(mean, torch.zeros_like(std))["scaling_factor"] == pytest.approx(
        1 / float(mean.std(unbiased=False)), rel=1e-6)


def test_diffusion_prior_learns_a_two_dimensional_mixture():
    # two Gaussians with unequal spread and a correlation: the samples' weights, means and
    # covariances match the mixture's (measured: weight 0.504, |mean error| <= 0.016, |cov error| <= 0.04
    # per component, 0.075 for the whole; the deterministic DDIM sampler of this small model spreads
    # the components wider, covariance 0.35 for 0.25)
    g = torch.Generator().manual_seed(0)
    n = 4000
    k = torch.rand(n, generator=g) < 0.5
    a = torch.tensor([-2.0, 0.0]) + 0.5 * torch.randn(n, 2, generator=g)
    b = torch.tensor([2.0, 1.0]) + torch.randn(n, 2, generator=g) @ torch.tensor([[0.6, 0.3], [0.0, 0.3]])
    z = torch.where(k[:, None], a, b)
    prior = DiffusionPrior([2], hidden=64, blocks=2, train_steps=1000, batch_size=256, lr=2e-3, ema=0.99)
    prior.fit(Latents(z, torch.zeros_like(z)))
    s = prior.sample(10000, torch.Generator().manual_seed(1), steps=50, eta=1.0)  # ancestral DDPM sampling
    assert float((s[:, 0] < 0).float().mean()) == pytest.approx(float(k.float().mean()), abs=0.03)
    for side, truth in ((s[:, 0] < 0, z[k]), (s[:, 0] >= 0, z[~k])):
        assert (s[side].mean(0) - truth.mean(0)).abs().max() < 0.1
        assert (torch.cov(s[side].T) - torch.cov(truth.T)).abs().max() < 0.1  # entries 0.09 to 0.45
    assert (s.mean(0) - z.mean(0)).abs().max() < 0.1
    assert (torch.cov(s.T) - torch.cov(z.T)).abs().max() < 0.25  # the whole covariance, 4.3 in the first entry


def test_gmm_prior_recovers_a_mixture_and_round_trips_through_a_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(3000, 2, generator=g) * 0.3 + torch.tensor([3.0, 0.0]),
                   torch.randn(1000, 2, generator=g) * 0.5 - torch.tensor([3.0, 0.0])])
    prior = GaussianMixturePrior([2], components=2)
    prior.fit(Latents(z))
    order = prior.loc[:, 0].argsort(descending=True)
    assert torch.allclose(prior.logits.exp()[order], torch.tensor([0.75, 0.25]), atol=0.01)
    assert torch.allclose(prior.loc[order], torch.tensor([[3.0, 0.0], [-3.0, 0.0]]), atol=0.05)
    path = save_prior(prior, tmp_path / "gmm.pt", {"scaling_factor": 1.0})
    record = torch.load(path, weights_only=True)
    assert record["kind"] == "gmm" and record["options"]["components"] == 2
    again, _ = load_prior(path)
    assert torch.equal(again.sample(50, torch.Generator().manual_seed(3)), prior.sample(50, torch.Generator().manual_seed(3)))


def test_diffusion_prior_on_latent_grids_uses_a_unet_and_refuses_other_shapes():
    prior = DiffusionPrior([2, 8, 8], hidden=16, train_steps=20, batch_size=16)
    z = torch.randn(64, 2, 8, 8)
    info = prior.fit(Latents(z, torch.full_like(z, 0.1)))
    assert np.isfinite(info["final_loss"]) and type(prior.net).__name__ == "SmallUNet"
    assert prior.sample(3, steps=4).shape == (3, 2, 8, 8)
    with pytest.raises(ValueError, match="vector latents"):
        DiffusionPrior([3, 5, 5])


# ----------------------------------------------------------------------------------------------
# a run directory through the CLI


@pytest.fixture
def run(tmp_path):
    g = torch.Generator().manual_seed(0)
    points = torch.randn(400, 2, generator=g) * torch.tensor([1.0, 2.0])
    np.save(tmp_path / "x.npy", points.numpy().astype(np.float32))
    config = TrainConfig(dataset=str(tmp_path / "x.npy"), likelihood="gaussian", z_dim=2, hidden=[16], epochs=1,
                         batch_size=50, device="cpu", estimator="elbo")
    train(config, tmp_path / "run", quiet=True)
    return tmp_path / "run"


def _one_line_error(capsys, *args) -> str:
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_encode_decode_prior_and_sample_through_a_run(run, tmp_path, capsys):
    assert cli("encode", run) == 0
    latents = torch.load(run / "latents.pt", weights_only=True)
    assert latents["train"]["mean"].shape == (360, 2) and latents["test"]["std"].shape == (40, 2)
    assert latents["sites"] == {"z": [2]} and latents["shape"] == [2] and latents["epoch"] == 1
    draws = latents["train"]["mean"] + latents["train"]["std"] * torch.randn(200, 360, 2)
    assert latents["scaling_factor"] == pytest.approx(1 / float(draws.std()), rel=1e-2)

    assert cli("decode", run, run / "latents.pt") == 0  # the test split's means: its reconstructions
    from pyro_vae.run import load_run

    _, model, guide = load_run(run)
    x = torch.from_numpy(np.load(tmp_path / "x.npy"))
    decoded = torch.from_numpy(np.load(run / "decoded.npy"))
    assert decoded.shape == (40, 2) and (run / "figures" / "decoded.png").exists()
    scaled = latents["test"]["mean"] * latents["scaling_factor"]
    torch.save(scaled, tmp_path / "scaled.pt")
    assert cli("decode", run, tmp_path / "scaled.pt", "--scaled") == 0
    assert torch.allclose(torch.from_numpy(np.load(run / "decoded.npy")), decoded, atol=1e-5)
    codec = pyro_vae.LatentCodec.from_run(run)  # diffusers' verbs, the file's scaling factor
    assert codec.scaling_factor == latents["scaling_factor"]
    assert torch.allclose(codec.encode(x[:5]).latent_dist.mean, encode(model, guide, x[:5]).latent_dist.mean)
    assert torch.allclose(codec.decode(latents["test"]["mean"]).sample, decoded, atol=1e-5)
    np.save(tmp_path / "more.npy", x[:7].numpy())
    assert cli("encode", run, "--data", tmp_path / "more.npy", "--out", tmp_path / "more.pt") == 0
    more = torch.load(tmp_path / "more.pt", weights_only=True)
    assert torch.allclose(more["data"]["mean"], codec.encode(x[:7]).latent_dist.mean)
    assert more["scaling_factor"] == pytest.approx(latents["scaling_factor"])

    assert cli("prior", run, "--kind", "gmm", "--components", 3, "--quiet") == 0
    assert cli("prior", run, "--kind", "diffusion", "--train-steps", 30, "--hidden", 32, "--quiet") == 0
    for kind in ("gmm", "diffusion"):
        record = torch.load(run / "priors" / f"{kind}.pt", weights_only=True)
        assert record["kind"] == kind and record["latents"]["scaling_factor"] == pytest.approx(latents["scaling_factor"])
        assert cli("sample", run, "--prior", kind, "--n", 50, "--denoising-steps", 5) == 0
        assert np.load(run / f"samples-{kind}.npy").shape == (50, 2)
    capsys.readouterr()

    # the run trains on: its priors were fitted to the old latents
    assert cli("train", "--resume", run, "--epochs", 2, "--quiet") == 0
    capsys.readouterr()
    assert "fit it again with `pyro-vae prior" in _one_line_error(capsys, "sample", run, "--prior", "gmm")


def test_latent_commands_fail_with_one_line_naming_the_fix(run, tmp_path, capsys):
    err = _one_line_error(capsys, "sample", run, "--prior", "diffusion")
    assert "has no diffusion prior" in err and "pyro-vae prior" in err
    torch.save(torch.zeros(5, 3), tmp_path / "wide.pt")
    assert "this run's are (2,)" in _one_line_error(capsys, "decode", run, tmp_path / "wide.pt")
    torch.save(torch.zeros(5, 2), tmp_path / "z.pt")
    assert "pyro-vae encode" in _one_line_error(capsys, "decode", run, tmp_path / "z.pt", "--scaled")
    assert "no latents file" in _one_line_error(capsys, "decode", run, tmp_path / "missing.pt")
    assert "option of --kind gmm" in _one_line_error(capsys, "prior", run, "--kind", "diffusion", "--components", 3)
    assert "known: diffusion, gmm" in _one_line_error(capsys, "prior", run, "--kind", "flow")
    (run / "priors").mkdir()
    (run / "priors" / "gmm.pt").write_bytes(b"not a prior")
    assert "damaged" in _one_line_error(capsys, "sample", run, "--prior", "gmm")
    with pytest.raises(PriorError, match="not a pyro-vae latent prior"):
        torch.save({"kind": "gmm"}, run / "priors" / "gmm.pt")
        load_prior(run / "priors" / "gmm.pt")


def test_frechet_distance_is_exact_for_an_affine_map_and_sample_quality_reports_classes():
    from pyro_vae.classifier import Classifier, frechet_distance, sample_quality

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 3, generator=g) @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.7]])
    # b = 2a + 1: ||mean(a) + 1||^2 + tr(S + 4S - 2 (4 S^2)^{1/2}) = ||mean(a) + 1||^2 + tr S
    expected = float(((a.double().mean(0) + 1) ** 2).sum() + torch.cov(a.T.double()).trace())
    assert frechet_distance(a, 2 * a + 1) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    clf = Classifier(16, 4, hidden=[8], net="mlp")
    q = sample_quality(clf, torch.rand(200, 16), torch.rand(300, 16))
    assert sum(q["class_histogram"]) == pytest.approx(1.0, abs=1e-3) and len(q["class_histogram"]) == 4
    assert 0.25 <= q["mean_confidence"] <= 1 and q["frechet_distance"] >= 0
