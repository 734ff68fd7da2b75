"""Disentanglement: the metrics on constructed codes, the beta-TCVAE estimator, dSprites."""

import math

import numpy as np
import pytest
import torch

from pyro_vae import disentanglement as D
from pyro_vae import dsprites
from pyro_vae.checks import DataError
from pyro_vae.cli import main
from pyro_vae.data import load_dataset
from pyro_vae.guides import GaussianGuide
from pyro_vae.models import VAE
from pyro_vae.objectives import Objective, make_estimator
from pyro_vae.objectives.base import traces
from pyro_vae.objectives.tc import NotFactorizedError, aggregate_log_q, pairwise_log_q

# --------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def grid_sample():
    """10,000 uniformly drawn dSprites factor rows, and the factors themselves as codes."""
    rng = np.random.default_rng(0)
    factors = dsprites.factors_of(rng.integers(dsprites.NUM_IMAGES, size=10_000))
    codes = (factors - factors.mean(0)) / factors.std(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    return factors, codes, codes @ rotation, rng.normal(size=codes.shape)


def test_the_factors_themselves_score_near_one_a_rotation_lower_and_noise_near_zero(grid_sample):
    factors, exact, rotated, noise = grid_sample
    small = dict(num_train=5000)
    scores = {name: {**D.mig(c, factors, **small), **D.dci(c, factors, num_train=5000, num_test=2000)}
              for name, c in (("exact", exact), ("rotated", rotated), ("noise", noise))}
    # 20 bins keep log 20 / log 32 of a uniform 32-valued factor: MIG is 1 for shape and scale, ~0.85 for the rest
    assert scores["exact"]["mig"] > 0.85
    assert scores["exact"]["dci_disentanglement"] > 0.9 and scores["exact"]["dci_completeness"] > 0.9
    assert scores["rotated"]["mig"] < 0.3 and scores["rotated"]["dci_disentanglement"] < 0.4
    assert scores["noise"]["mig"] < 0.02 and scores["noise"]["dci_disentanglement"] < 0.2
    # a rotation keeps the information: the linear read-out is as informative
    assert scores["rotated"]["dci_informativeness_test"] == pytest.approx(scores["exact"]["dci_informativeness_test"], abs=0.03)
    assert scores["noise"]["dci_informativeness_test"] < 0.2


def test_intervention_scores_and_sap_rank_exact_rotated_and_noise_codes(grid_sample):
    factors, exact, rotated, noise = grid_sample
    n = dict(num_train=1000, num_eval=500)
    fv = [D.factor_vae_score(c, factors, **n)["factor_vae_score"] for c in (exact, rotated, noise)]
    bv = [D.beta_vae_score(c, factors, **n)["beta_vae_score"] for c in (exact, rotated, noise)]
    assert fv[0] == 1.0 and bv[0] > 0.98
    assert fv[2] < 0.35 and bv[2] < 0.35  # chance is 1/5
    assert fv[0] > fv[1] > fv[2]
    sap = [D.sap(c[:, :5], factors, num_train=2000, num_test=1000)["sap"] for c in (exact, noise)]
    assert sap[0] > 0.3 and sap[1] < 0.05


def test_mutual_information_and_discretization_match_hand_computed_values():
    a = np.array([0, 0, 1, 1])
    assert D.mutual_information(a, a) == pytest.approx(math.log(2))
    assert D.mutual_information(a, np.array([0, 1, 0, 1])) == pytest.approx(0.0)
    assert D.discretize(np.linspace(0, 1, 40)[:, None], 20)[:, 0].tolist() == [i // 2 for i in range(40)]


def test_discretize_is_disentanglement_libs_histogram_discretizer_up_to_numbering():
    # disentanglement_lib: np.digitize(x, np.histogram(x, bins)[1][:-1]), ids 1..bins; here ids 0..bins-1
    x = np.random.default_rng(1).normal(size=(500, 3)) ** 3
    theirs = np.stack([np.digitize(c, np.histogram(c, 20)[1][:-1]) for c in x.T], axis=1)
    assert (D.discretize(x, 20) == theirs - 1).all()


def test_a_collapsed_code_that_wiggles_with_a_factor_lowers_mig_as_in_disentanglement_lib(grid_sample):
    # 20 bins over each code's own range: a dead code (sd 1e-3) whose mean follows a factor carries
    # as much binned information as a live one; disentanglement_lib's MIG does not prune it either
    factors, exact, _, _ = grid_sample
    alone = D.mig(exact, factors, num_train=5000)["mig_per_factor"][3]
    wiggle = 1e-3 * exact[:, 3:4] + 1e-4 * np.random.default_rng(2).normal(size=(len(exact), 1))
    with_dead = D.mig(np.hstack([exact, wiggle]), factors, num_train=5000)["mig_per_factor"][3]
    assert alone > 0.8 and with_dead < 0.3


def test_a_dead_code_is_labelled_inactive_and_a_live_one_by_its_factor(grid_sample):
    factors, exact, _, _ = grid_sample
    codes = np.concatenate([exact[:, [3]], np.full((len(exact), 1), 0.01) + 1e-4 * exact[:, [0]]], 1)
    names = D.captured_factor(D.mig(codes, factors)["mutual_information"], dsprites.FACTOR_NAMES, codes)
    assert names == ["pos_x", "-"]


# --------------------------------------------------------------------------- beta-TCVAE


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    return VAE(x_dim=6, z_dim=3, hidden=[8]), GaussianGuide(x_dim=6, z_dim=3, hidden=[8])


def _direct_log_q(guide, x, z):
    """log q(z_i,j | x_n) by hand: [i, n, j]."""
    loc, scale = guide.encoder(x)
    return torch.distributions.Normal(loc[None], scale[None]).log_prob(z[:, None]).double()


def test_pairwise_densities_and_both_estimates_of_log_qz_match_a_direct_computation(pair):
    model, guide = pair
    x = torch.bernoulli(torch.rand(7, 6))
    _, guide_trace = traces(model, guide, x, 1, 1, layout="repeated")
    pairs = pairwise_log_q(guide_trace, -1)
    with torch.no_grad():
        direct = _direct_log_q(guide, x, guide_trace.nodes["z"]["value"])
    assert torch.allclose(pairs[0].double(), direct, atol=1e-5)
    # MWS on a data set of N = 50 from a batch of 7: log q(z_i) = log sum_n q(z_i|x_n) - log(N B), by loops
    pairs = pairs.detach()
    mws, mws_dims = aggregate_log_q(pairs, 50, "mws")
    for i in range(7):
        joint = [float(direct[i, n].sum()) for n in range(7)]
        assert float(mws[0, i]) == pytest.approx(math.log(sum(math.exp(v) for v in joint)) - math.log(350), abs=1e-4)
        for j in range(3):
            marg = math.log(sum(math.exp(float(direct[i, n, j])) for n in range(7))) - math.log(350)
            assert float(mws_dims[0, i, j]) == pytest.approx(marg, abs=1e-4)
    # MSS with the batch as the whole data set (N = B) is the exact aggregate posterior
    mss, mss_dims = aggregate_log_q(pairs, 7, "mss")
    exact = torch.logsumexp(direct.sum(-1), 1) - math.log(7)
    assert torch.allclose(mss[0].double(), exact, atol=1e-5)
    assert torch.allclose(mss_dims[0].double(), torch.logsumexp(direct, 1) - math.log(7), atol=1e-5)


def test_beta_one_is_the_elbo_draw_for_draw_and_in_expectation(pair):
    model, guide = pair
    x = torch.bernoulli(torch.rand(5, 6))
    values = {}
    for spec in ("beta-tcvae", "beta-tcvae:beta=1,sampling=mss,N=9", "elbo"):
        torch.manual_seed(1)
        values[spec] = float(Objective(model, guide, make_estimator(spec)).forward(x).detach())
    assert values["beta-tcvae"] == values["beta-tcvae:beta=1,sampling=mss,N=9"] == pytest.approx(values["elbo"], rel=1e-6)
    with torch.no_grad():
        tc = float(Objective(model, guide, make_estimator("beta-tcvae", particles=4000)).forward(x))
        closed_form = float(Objective(model, guide, make_estimator("meanfield", particles=4000)).forward(x))
    assert tc == pytest.approx(closed_form, abs=0.05)


@pytest.mark.parametrize("k", [1, 3])
def test_beta_weights_the_total_correlation_as_computed_by_hand(pair, k):
    model, guide = pair
    x = torch.bernoulli(torch.rand(6, 6))
    torch.manual_seed(2)
    with torch.no_grad():
        loss = float(Objective(model, guide, make_estimator(f"beta-tcvae:beta=5,sampling=mss,N=6,K={k}")).forward(x))
        torch.manual_seed(2)  # the same draws: K = 1 repeats the batch, K > 1 is a vectorized particle plate
        model_trace, guide_trace = traces(model, guide, x, k, 1, layout="repeated" if k == 1 else "vectorized")
        z = guide_trace.nodes["z"]["value"].reshape(k, 6, 3)
        tc = []
        for particle in range(k):  # each particle estimates q(z) from its own batch of codes
            direct = _direct_log_q(guide, x, z[particle])
            log_qz = torch.logsumexp(direct.sum(-1), 1) - math.log(6)  # exact: the batch is the data set
            tc.append(log_qz - (torch.logsumexp(direct, 1) - math.log(6)).sum(-1))
        elbo = (model_trace.log_prob_sum() - guide_trace.log_prob_sum()).double() / (6 * k)
    tc = torch.stack(tc).mean()
    assert loss == pytest.approx(float(-(elbo - 4 * tc)), abs=1e-4)
    assert abs(float(tc)) > 1e-3  # the total-correlation term is there to be weighted


def test_beta_tcvae_refuses_what_it_cannot_estimate(pair):
    from pyro_vae.guides.flows import LowRankGuide
    from pyro_vae.guides.hierarchical import HierarchicalGuide
    from pyro_vae.models.hierarchical import HierarchicalVAE

    model, _ = pair
    x = torch.bernoulli(torch.rand(4, 6))
    with pytest.raises(NotFactorizedError, match="factorizes over latent dimensions.*'z'"):
        Objective(model, LowRankGuide(x_dim=6, z_dim=3, hidden=[8]), make_estimator("beta-tcvae:beta=4,N=10"))(x)
    with pytest.raises(ValueError, match="needs the data set's size N"):
        Objective(model, pair[1], make_estimator("beta-tcvae:beta=4"))(x)
    with pytest.raises(ValueError, match="sampling must be one of mws, mss"):
        make_estimator("beta-tcvae:sampling=xyz")
    h_model, h_guide = HierarchicalVAE(x_dim=6), HierarchicalGuide(x_dim=6)
    with pytest.raises(NotFactorizedError, match="depends on the draw of an earlier site"):
        Objective(h_model, h_guide, make_estimator("beta-tcvae:beta=4,N=10"))(x)


def test_training_tells_beta_tcvae_the_training_set_size(tmp_path):
    from pyro_vae import TrainConfig, train

    np.save(tmp_path / "toy.npy", (np.random.default_rng(0).random((60, 6)) > 0.5).astype(np.float32))
    config = TrainConfig(dataset=str(tmp_path / "toy.npy"), estimator="beta-tcvae:beta=4,sampling=mss",
                         z_dim=2, hidden=[8], epochs=1, batch_size=16)
    rows = train(config, tmp_path / "run", quiet=True)
    assert math.isfinite(rows[-1]["test_loss"])


# --------------------------------------------------------------------------- dSprites


def test_dsprites_grid_is_the_original_order_and_rendering_is_deterministic():
    assert dsprites.NUM_IMAGES == 737_280 and dsprites.FACTOR_SIZES == (3, 6, 40, 32, 32)
    assert dsprites.FACTOR_VALUES[2][-1] == pytest.approx(2 * math.pi)
    index = np.array([0, 1, 32, 1024, 40 * 1024, 6 * 40 * 1024, dsprites.NUM_IMAGES - 1])
    assert dsprites.factors_of(index).tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [0, 0, 1, 0, 0],
                                                   [0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [2, 5, 39, 31, 31]]
    rows = dsprites.factors_of(np.random.default_rng(1).integers(dsprites.NUM_IMAGES, size=300))
    assert (dsprites.index_of(rows) == dsprites.index_of(dsprites.factors_of(dsprites.index_of(rows)))).all()
    a, b = dsprites.render(rows), dsprites.render(rows)
    assert a.shape == (300, 64, 64) and a.dtype == np.uint8 and set(np.unique(a)) == {0, 1}
    assert (a == b).all()
    assert 0.02 < a.mean() < 0.06  # the original's mean pixel is 0.042
    # 0 and 2 pi are the same angle (as in the original); x moves columns, y rows; bigger is bigger
    first, last = dsprites.render([[2, 5, 0, 9, 20], [2, 5, 39, 9, 20]])
    assert (first == last).all()
    left, right, top, small = dsprites.render([[1, 3, 0, 0, 16], [1, 3, 0, 31, 16], [1, 3, 0, 16, 0], [1, 0, 0, 16, 16]])
    cols, rows_ = np.arange(64)[None, :], np.arange(64)[:, None]
    assert (left * cols).sum() / left.sum() < 20 < 44 < (right * cols).sum() / right.sum()
    assert (top * rows_).sum() / top.sum() < 20
    assert small.sum() < 0.4 * top.sum()


def _fake_npz(path, n=200, seed=0):
    """A small file with the original's keys: colour column included, and a metadata entry."""
    rows = dsprites.factors_of(np.random.default_rng(seed).integers(dsprites.NUM_IMAGES, size=n))
    classes = np.concatenate([np.zeros((n, 1), np.int64), rows], 1)
    values = np.concatenate([np.ones((n, 1)), np.stack([v[c] for v, c in zip(dsprites.FACTOR_VALUES, rows.T)], 1)], 1)
    np.savez(path, imgs=dsprites.render(rows), latents_classes=classes, latents_values=values,
             metadata=np.array(["not read"]))
    return rows


def test_the_original_npz_is_read_with_its_keys_and_the_constant_colour_dropped(tmp_path):
    rows = _fake_npz(tmp_path / "dsprites.npz")
    data = load_dataset(str(tmp_path / "dsprites.npz"), test_size=50, image_size=32)
    assert data.factor_names == dsprites.FACTOR_NAMES and data.image_shape == (1, 32, 32)
    assert data.train.shape == (150, 1024) and data.test_factors.shape == (50, 5)
    test_rows, _ = dsprites.split_indices(200, None, 50)[1], None
    assert (data.test_factors.numpy() == rows[test_rows]).all()
    assert (data.test.reshape(-1, 32, 32).numpy() == dsprites.downsample(dsprites.render(rows[test_rows]), 32)).all()
    np.savez(tmp_path / "other.npz", imgs=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="lacks the keys.*latents_classes"):
        load_dataset(str(tmp_path / "other.npz"))


def test_disentangle_command_writes_metrics_and_a_labelled_traversal(tmp_path, capsys):
    _fake_npz(tmp_path / "d.npz", n=1500)
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path / "d.npz"), "--image-size", "16", "--z-dim", "4",
                 "--hidden", "64", "--epochs", "1", "--test-size", "600", "--estimator", "beta-tcvae:beta=6",
                 "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["disentangle", str(run), "--points", "600"]) == 0
    out = capsys.readouterr().out
    assert "mig" in out and "factor_vae_score" in out and "dci_disentanglement" in out
    import json

    result = json.loads((run / "disentangle.json").read_text())
    assert result["points"] == 600 and len(result["captured_factor"]) == 4
    assert 0 <= result["mig"] <= 1 and result["reconstruction"] > 0
    assert (run / "figures" / "disentangle_traversals.png").exists()


USER_PROGRAM = """
import pyro
import pyro.distributions as dist
import torch
from torch import nn


class VAE(nn.Module):
    def __init__(self, z_dim=4, hidden_dim=64):
        super().__init__()
        self.z_dim = z_dim
        self.enc = nn.Sequential(nn.Linear(256, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 2 * z_dim))
        self.dec = nn.Sequential(nn.Linear(z_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 256))

    def model(self, x):
        pyro.module("dec", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x.reshape(-1, 256))

    def guide(self, x):
        pyro.module("enc", self.enc)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.enc(x.reshape(-1, 256)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))
"""


def test_a_users_pyro_program_trains_as_beta_tcvae_and_is_measured(tmp_path, capsys, monkeypatch):
    """A model/guide pair written the way Pyro's examples are (pyro.module, a plate, to_event),
    knowing nothing of pyro-vae: beta-TCVAE finds its factorized latent site, and `disentangle`
    reads its codes, once the run's code is trusted."""
    (tmp_path / "my_dsprites_vae.py").write_text(USER_PROGRAM)
    monkeypatch.syspath_prepend(str(tmp_path))
    _fake_npz(tmp_path / "d.npz", n=1000)
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path / "d.npz"), "--image-size", "16", "--z-dim", "4",
                 "--model", "my_dsprites_vae:VAE", "--guide", "my_dsprites_vae:VAE", "--epochs", "1",
                 "--test-size", "400", "--estimator", "beta-tcvae:beta=6", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["disentangle", str(run), "--points", "400"]) == 2
    assert "--trust-code" in capsys.readouterr().err
    assert main(["disentangle", str(run), "--points", "400", "--trust-code"]) == 0
    import json

    result = json.loads((run / "disentangle.json").read_text())
    assert len(result["captured_factor"]) == 4 and 0 <= result["mig"] <= 1 and result["reconstruction"] > 0


def test_disentangle_refuses_data_without_factors_in_one_line(tmp_path, capsys):
    np.save(tmp_path / "toy.npy", (np.random.default_rng(0).random((40, 6)) > 0.5).astype(np.float32))
    assert main(["train", "--dataset", str(tmp_path / "toy.npy"), "--z-dim", "2", "--hidden", "8", "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["disentangle", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "carry no factor labels" in err and "--dataset dsprites" in err and "\n" not in err


@pytest.mark.slow
def test_dsprites_dataset_is_a_random_subset_of_the_cached_grid(tmp_path):
    data = load_dataset("dsprites", data_dir=tmp_path, train_size=500, test_size=100)
    assert data.train.shape == (500, 4096) and data.factor_names == dsprites.FACTOR_NAMES
    rendered = dsprites.render(data.train_factors.numpy()).reshape(500, -1)
    assert (data.train.numpy() == rendered).all()
    again = load_dataset("dsprites", data_dir=tmp_path, train_size=500, test_size=100)  # from the cache
    assert torch.equal(again.train_factors, data.train_factors)


def test_a_pt_file_with_factors_carries_them_into_both_splits(tmp_path):
    rows = dsprites.factors_of(np.random.default_rng(3).integers(dsprites.NUM_IMAGES, size=100))
    x = torch.from_numpy(dsprites.downsample(dsprites.render(rows), 16)).float()
    torch.save({"x": x, "factors": torch.from_numpy(rows)}, tmp_path / "f.pt")
    data = load_dataset(str(tmp_path / "f.pt"))
    assert data.train_factors.shape == (90, 5) and data.test_factors.shape == (10, 5)
    assert data.factor_names == tuple(f"factor_{j}" for j in range(5))
    again = torch.from_numpy(dsprites.downsample(dsprites.render(data.test_factors.numpy()), 16)).reshape(10, -1).float()
    assert torch.equal(again, data.test)  # factors travel with their rows
    torch.save({"x": x, "factors": torch.rand(100, 5)}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="'factors' must be class ids"):
        load_dataset(str(tmp_path / "bad.pt"))


def test_total_correlation_is_exact_with_one_batch_and_near_it_with_several(pair):
    from pyro_vae.objectives.tc import total_correlation

    model, guide = pair
    x = torch.bernoulli(torch.rand(40, 6))
    one = total_correlation(model, guide, x, batch_size=40, seed=3)
    torch.manual_seed(3)
    with torch.no_grad():
        z = guide.posterior(x).rsample()
        direct = _direct_log_q(guide, x, z)
    exact = float((torch.logsumexp(direct.sum(-1), 1) - (torch.logsumexp(direct, 1)).sum(-1)).mean() + 2 * math.log(40))
    assert one == pytest.approx(exact, abs=1e-4)
    assert total_correlation(model, guide, x, batch_size=20, seed=3) == pytest.approx(one, abs=0.15)
