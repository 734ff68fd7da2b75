"""What people do with a trained VAE: imputation, anomaly scores, interpolation, traversals.
The linear-Gaussian model gives exact answers to check them against."""

import json

import numpy as np
import pytest
import torch

from pyro_vae import cli
from pyro_vae.applications import (
    anomaly_scores,
    auroc,
    encode,
    impute,
    interpolate,
    linear_probe,
    missing_mask,
    slerp,
    traverse,
)
from pyro_vae.data import DataError, load_dataset
from pyro_vae.evaluation import mutual_information, posterior_means
from pyro_vae.guides import GaussianGuide, HierarchicalGuide, IAFGuide, LinearPosteriorGuide
from pyro_vae.models import HierarchicalVAE, LinearGaussian


@pytest.fixture
def linear():
    torch.manual_seed(0)
    model = LinearGaussian(x_dim=6, z_dim=2, noise_scale=0.5)
    for p in model.parameters():
        p.requires_grad_(False)
    x = model.marginal().sample((200,))
    observed = torch.tensor([True, True, True, False, False, False])
    cov = model.marginal().covariance_matrix
    o, m = observed, ~observed
    exact = model.bias[m] + (x[:, o] - model.bias[o]) @ torch.linalg.solve(cov[o][:, o], cov[o][:, m])
    return model, x, observed, exact


@pytest.mark.parametrize("guide_name, steps, tolerance", [("exact posterior", 500, 0.03), ("untrained Gaussian", 2000, 0.06)])
def test_impute_recovers_the_exact_conditional_mean_of_the_linear_model(linear, guide_name, steps, tolerance):
    # Metropolis-within-Gibbs targets p(x_m | x_o) whatever the proposal: an untrained guide
    # only mixes more slowly. E[x_m | x_o] is closed-form for probabilistic PCA.
    model, x, observed, exact = linear
    guide = LinearPosteriorGuide(model) if guide_name == "exact posterior" else GaussianGuide(
        x_dim=6, z_dim=2, hidden=[16], activation="tanh")
    r = impute(model, guide, x, observed, num_steps=steps, burn_in=100)
    error = float((r["mean"][:, ~observed] - exact).abs().mean())
    unconditional = float((model.bias[~observed] - exact).abs().mean())
    assert error < tolerance < unconditional / 5  # measured 0.010 and 0.027; the prior mean is 0.42 off
    assert torch.equal(r["mean"][:, observed], x[:, observed]) and torch.equal(r["sample"][:, observed], x[:, observed])
    assert 0 < r["acceptance"] <= 1


def test_pseudo_gibbs_needs_the_exact_posterior_where_metropolis_within_gibbs_does_not(linear):
    # Rezende et al.'s pseudo-Gibbs accepts every proposal: exact only when q(z|x) = p(z|x)
    model, x, observed, exact = linear
    rough = GaussianGuide(x_dim=6, z_dim=2, hidden=[16], activation="tanh")
    errors = {method: float((impute(model, guide, x, observed, 500, 100, method=method)["mean"][:, ~observed]
                             - exact).abs().mean())
              for method, guide in (("pseudo-gibbs", LinearPosteriorGuide(model)), ("mwg", rough))}
    biased = impute(model, rough, x, observed, 500, 100, method="pseudo-gibbs")["mean"][:, ~observed]
    assert errors["pseudo-gibbs"] < 0.03 and errors["mwg"] < 0.08
    assert float((biased - exact).abs().mean()) > 0.2  # measured 0.44: it samples the wrong law


def test_anomaly_scores_are_the_exact_negative_log_likelihood_of_the_linear_model(linear):
    model, x, _, _ = linear
    scores = anomaly_scores(model, LinearPosteriorGuide(model), x, k=10)
    assert np.allclose(scores, -model.log_marginal(x).numpy(), atol=1e-4)


def test_auroc_is_the_share_of_pairs_ranked_right_with_ties_halved():
    rng = np.random.default_rng(0)
    normal, anomalous = rng.integers(0, 6, 40).astype(float), rng.integers(2, 8, 30).astype(float)
    pairs = (anomalous[None, :] > normal[:, None]) + 0.5 * (anomalous[None, :] == normal[:, None])
    assert auroc(normal, anomalous) == pytest.approx(pairs.mean())
    assert auroc([1, 2], [3, 4]) == 1.0 and auroc([3, 4], [1, 2]) == 0.0 and auroc([1, 1], [1]) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        auroc([], [1.0])


def test_linear_probe_reads_out_what_the_features_hold_and_nothing_more():
    g = torch.Generator().manual_seed(0)
    y_train, y_test = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (1000,), generator=g)
    centres = 3 * torch.randn(5, 8, generator=g)
    f_train = centres[y_train] + torch.randn(300, 8, generator=g)
    f_test = centres[y_test] + torch.randn(1000, 8, generator=g)
    assert linear_probe(f_train, y_train, f_test, y_test) > 0.97
    noise = torch.randn(300, 8, generator=g), torch.randn(1000, 8, generator=g)
    assert linear_probe(noise[0], y_train, noise[1], y_test) < 0.3  # chance is 0.2


def test_slerp_keeps_the_norm_where_the_straight_line_shrinks_it():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(path[0, 0], a[0]) and torch.allclose(path[0, -1], b[0], atol=1e-6)
    assert torch.allclose(path.norm(dim=-1), torch.full((1, 5), 3.0))
    assert torch.allclose(slerp(a, 2 * a, torch.tensor([0.5])), 1.5 * a)  # parallel: the straight line


def test_interpolation_ends_at_the_reconstructions_and_traversal_moves_one_dimension(linear):
    model, x, _, _ = linear
    guide = LinearPosteriorGuide(model)
    for method in ("slerp", "linear"):
        path = interpolate(model, guide, x[:4], x[4:8], steps=6, method=method)
        assert path.shape == (4, 6, 6)
        assert torch.allclose(path[:, 0], model.decode(encode(guide, x[:4])).mean, atol=1e-5)
        assert torch.allclose(path[:, -1], model.decode(encode(guide, x[4:8])).mean, atol=1e-5)
    grid = traverse(model, guide, x[:2], dims=[1, 0], span=2.0, steps=5)  # (rows, dims, steps, D)
    assert grid.shape == (2, 2, 5, 6)
    # the decoder mean is W z + b: stepping dimension d by 1 moves it by the column W[:, d]
    assert torch.allclose(grid[:, 0, 1:] - grid[:, 0, :-1], model.weight[:, 1].expand(2, 4, 6), atol=1e-5)
    assert torch.allclose(grid[:, 1, 1:] - grid[:, 1, :-1], model.weight[:, 0].expand(2, 4, 6), atol=1e-5)
    # two latent layers (no decode/prior fast path for p(z2) p(z1|z2)) impute from traces
    x2, half = (torch.rand(2, 784) < 0.3).float(), torch.arange(784) < 392
    r = impute(HierarchicalVAE(), HierarchicalGuide(), x2, half, num_steps=4, burn_in=1)
    assert r["mean"].shape == (2, 784) and torch.equal(r["mean"][:, half], x2[:, half])
    assert ((r["mean"][:, ~half] > 0) & (r["mean"][:, ~half] < 1)).all() and 0 <= r["acceptance"] <= 1
    with pytest.raises(ValueError, match="--dims 2: no such latent dimension; this model has 2"):
        traverse(model, guide, x[:1], dims=[2])
    with pytest.raises(ValueError, match="unknown interpolation method"):
        interpolate(model, guide, x[:1], x[1:2], method="cubic")


def test_missing_masks():
    halves = missing_mask(3, 16, (1, 4, 4), "bottom-half")
    assert halves.shape == (3, 16) and halves[:, 8:].all() and not halves[:, :8].any()
    right = missing_mask(1, 16, (1, 4, 4), "right-half").reshape(4, 4)
    assert right[:, 2:].all() and not right[:, :2].any()
    random = missing_mask(200, 100, None, "random", fraction=0.3)
    assert abs(float(random.float().mean()) - 0.3) < 0.02
    with pytest.raises(ValueError, match="needs images"):
        missing_mask(1, 10, None, "bottom-half")


def test_flow_guides_have_posterior_means_and_say_why_mutual_information_is_missing(small_mnist):
    guide = IAFGuide(x_dim=784, z_dim=4, hidden=[32])
    means = posterior_means(guide, small_mnist.test[:20], num_samples=500)["z"]
    assert means.shape == (20, 4) and torch.isfinite(means).all()
    with torch.no_grad():
        draws = guide.posterior(small_mnist.test[:20]).sample((4000,))
    standard_error = draws.std(0) * (1 / 500 + 1 / 4000) ** 0.5  # of an average of 500 draws, not of one
    assert ((means - draws.mean(0)).abs() < 5 * standard_error).all()
    with pytest.raises(ValueError, match="flow"):
        mutual_information(guide, small_mnist.test[:20])


def test_classes_keep_only_those_labels_in_training_and_test_data():
    data = load_dataset("mnist", "cpu", classes=[3, 7])
    assert set(data.train_labels.unique().tolist()) == {3, 7} == set(data.test_labels.unique().tolist())
    full = load_dataset("mnist", "cpu")
    assert len(data.test) == int(((full.test_labels == 3) | (full.test_labels == 7)).sum())
    with pytest.raises(DataError, match="not labels"):
        load_dataset("mnist", "cpu", classes=[10])


def pyro_vae(*args) -> int:
    """The command in this process (a subprocess per call would re-import torch each time)."""
    return cli.main([str(a) for a in args])


def test_cli_anomaly_impute_interpolate_traverse_on_mnist(tmp_path, capsys):
    run = tmp_path / "run"
    assert pyro_vae("train", "--preset", "iwae1", "--classes", *range(9), "--epochs", 1, "--train-size", 2000,
                    "--test-size", 300, "--out", run, "--quiet") == 0
    assert pyro_vae("anomaly", run, "--k", 10, "--test-size", 300) == 0
    result = json.loads((run / "anomaly.json").read_text())
    test_labels = load_dataset("binarized-mnist", "cpu", test_size=300).test_labels
    assert result["anomalous_points"] == int((test_labels == 9).sum()) > 0
    assert 0 <= result["auroc_other_classes"] <= 1
    assert len(np.load(run / "anomaly_scores.npz")["test_scores"]) == 300
    points = tmp_path / "noise.npy"
    np.save(points, np.random.default_rng(0).integers(0, 2, (50, 784)).astype(np.float32))
    assert pyro_vae("anomaly", run, "--k", 10, "--test-size", 300, "--data", points) == 0
    assert json.loads((run / "anomaly.json").read_text())["auroc_data"] > 0.99  # coin-flip pixels are no digits
    bad = tmp_path / "wide.npy"
    np.save(bad, np.zeros((5, 100), np.float32))
    capsys.readouterr()
    assert pyro_vae("anomaly", run, "--data", bad) == 2
    assert "100 features" in capsys.readouterr().err

    assert pyro_vae("impute", run, "--n", 20, "--steps", 30, "--burn-in", 10) == 0
    imputed = json.loads((run / "impute.json").read_text())
    assert "RMSE" in capsys.readouterr().out and imputed["points"] == 20 and 0 < imputed["acceptance"] <= 1
    assert pyro_vae("interpolate", run, "--pairs", 3, "--steps", 5) == 0
    assert pyro_vae("traverse", run, "--num-dims", 4) == 0
    assert pyro_vae("represent", run, "--labels", 20, 100) == 0
    probe = json.loads((run / "represent.json").read_text())
    assert [r["labels"] for r in probe["rows"]] == [20, 100] and probe["latent_dims"] == 50
    assert all(0.1 < r["latent_accuracy"] <= 1 and 0.1 < r["raw_accuracy"] <= 1 for r in probe["rows"])
    for name in ("anomalies", "imputations", "interpolations", "traversals"):
        assert (run / "figures" / f"{name}.png").stat().st_size > 1000


def test_image_grid_tiles_like_torchvision_make_grid():
    """The figures tile images without importing torchvision (seconds at start-up): same layout."""
    from torchvision.utils import make_grid

    from pyro_vae.plots import image_grid

    for n, nrow, channels in [(64, 8, 1), (10, 8, 3), (3, 8, 1), (17, 5, 1)]:
        x = torch.rand(n, channels, 6, 5)
        expected = make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
        assert torch.equal(image_grid(x, nrow), expected[:channels])  # make_grid copies grey to 3 channels
