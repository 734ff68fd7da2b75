"""What people do with a trained VAE: encode data, interpolate between data points, traverse
latent dimensions, score anomalies, impute missing features and read out representations.

Each works with any unconditional model that offers ``decode(z)`` (and, for imputation,
``prior(batch_shape)``) and a guide that offers ``posterior(x)``: the built-in pairs and your
own. ``z`` is the guide's first latent site, the one ``decode`` takes (``z1`` of ``hvae2``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributions as tdist

from pyro_vae.evaluation import active_units_per_site, evaluate, posterior_means


def check_pair_for(what: str, model, guide) -> None:
    """Raise ValueError naming the fix when ``model``/``guide`` cannot serve ``what``."""
    keys = tuple(getattr(model, "context_keys", ())) or tuple(getattr(guide, "context_keys", ()))
    if keys:
        raise ValueError(f"{what} works with unconditional models; {type(model).__name__} also needs "
                         f"{', '.join(keys)} (for class-conditional models use `pyro-vae sample --label`)")
    if not hasattr(guide, "posterior") or not hasattr(model, "decode"):
        raise ValueError(f"{what} needs a model with decode(z) and a guide with posterior(x); "
                         f"{type(model).__name__} / {type(guide).__name__} lack one")


def _decode_mean(model, z: torch.Tensor) -> torch.Tensor:
    """Decoder means for codes of any leading shape (..., z_dim) -> (..., D)."""
    flat = z.reshape(-1, z.shape[-1])
    return model.decode(flat).mean.reshape(*z.shape[:-1], -1)


@torch.no_grad()
def encode(guide, x: torch.Tensor, num_samples: int = 64, seed: int = 0) -> torch.Tensor:
    """E_q[z | x] for each row of x (N, z_dim): the closed-form mean of q(z|x) where it has one,
    else the average of ``num_samples`` draws (a flow such as ``iaf``)."""
    return next(iter(posterior_means(guide, x, num_samples, seed).values()))


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of a and b at fractions t (Shoemake 1985; White 2016,
    "Sampling generative networks"): keeps the norm typical of a Gaussian prior, where the
    straight line passes through the low-density centre. Returns (rows, len(t), dims)."""
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)[:, None, None]
    t = t[None, :, None]
    sin = torch.sin(omega)
    straight = sin.abs() < 1e-6  # (anti)parallel codes: fall back to the straight line
    safe = torch.where(straight, torch.ones_like(sin), sin)
    wa = torch.where(straight, 1 - t, torch.sin((1 - t) * omega) / safe)
    wb = torch.where(straight, t, torch.sin(t * omega) / safe)
    return wa * a[:, None] + wb * b[:, None]


@torch.no_grad()
def interpolate(model, guide, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10,
                method: str = "slerp") -> torch.Tensor:
    """Decoder means along the path from the code of each row of x_a to that of the same row of
    x_b: (rows, steps, D), the first and last columns the two reconstructions.
    ``method``: ``slerp`` (spherical, the default) or ``linear``."""
    check_pair_for("interpolation", model, guide)
    if steps < 2:
        raise ValueError(f"--steps must be at least 2 (the two end points), got {steps}")
    z_a, z_b = encode(guide, x_a), encode(guide, x_b)
    t = torch.linspace(0, 1, steps, device=z_a.device)
    if method == "slerp":
        z = slerp(z_a, z_b, t)
    elif method == "linear":
        z = (1 - t)[None, :, None] * z_a[:, None] + t[None, :, None] * z_b[:, None]
    else:
        raise ValueError(f"unknown interpolation method {method!r}; choose slerp or linear")
    return _decode_mean(model, z)


@torch.no_grad()
def most_active_dims(guide, x: torch.Tensor, n: int) -> list[int]:
    """The n latent dimensions whose posterior mean varies most over the rows of x
    (A_u = Var_x E_q[z_u|x], the active-unit statistic of Burda et al. 2016)."""
    _, variances = next(iter(active_units_per_site(guide, x).values()))  # the site decode takes
    return variances.argsort(descending=True)[:n].tolist()


@torch.no_grad()
def traverse(model, guide, x: torch.Tensor, dims, span: float = 3.0, steps: int = 9) -> torch.Tensor:
    """Latent traversals (Higgins et al. 2017): for each row of x, its code with dimension d set
    in turn to ``steps`` values from -span to span (prior standard deviations of N(0, I)), all
    other dimensions kept, decoded: (rows, len(dims), steps, D)."""
    check_pair_for("a latent traversal", model, guide)
    z = encode(guide, x)
    bad = [d for d in dims if not 0 <= d < z.shape[-1]]
    if bad:
        raise ValueError(f"latent dimensions {bad} do not exist: this model has {z.shape[-1]} (0..{z.shape[-1] - 1})")
    values = torch.linspace(-span, span, steps, device=z.device)
    grid = z[:, None, None, :].repeat(1, len(dims), steps, 1)
    for i, d in enumerate(dims):
        grid[:, i, :, d] = values
    return _decode_mean(model, grid)


def anomaly_scores(model, guide, x: torch.Tensor, k: int = 100, seed: int = 0, **evaluate_options) -> np.ndarray:
    """-log p(x) per row by importance sampling with k particles (``evaluate``): the higher,
    the less the model expects the row. The VAE detector of An & Cho 2015 scores the related
    reconstruction probability E_q p(x|z); likelihood scores are known to rank some
    out-of-distribution sets as *more* likely (Nalisnick et al. 2019), so check the AUROC on
    data like yours."""
    r = evaluate(model, guide, x, k, seed=seed, psis=False, return_points=True, **evaluate_options)
    return -r["points"]["log_px"]


def auroc(normal_scores, anomalous_scores) -> float:
    """Area under the ROC curve of scores that should be higher for anomalies: the probability
    that a random anomaly outscores a random normal row, ties counting one half (Mann-Whitney U
    divided by n m)."""
    normal, anomalous = np.asarray(normal_scores, float).ravel(), np.asarray(anomalous_scores, float).ravel()
    if not len(normal) or not len(anomalous):
        raise ValueError("AUROC needs at least one normal and one anomalous score")
    scores = np.concatenate([normal, anomalous])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value's first copy
    ranks = (first + (counts - 1) / 2.0)[inverse]  # ties share their average rank
    u = ranks[len(normal):].sum() - len(anomalous) * (len(anomalous) + 1) / 2.0
    return float(u / (len(normal) * len(anomalous)))


def _observation_terms(model, z: torch.Tensor, x: torch.Tensor):
    """(per-feature log p(x_d | z), the per-feature distribution) of the model's decoder at z."""
    d = model.decode(z)
    if not isinstance(d, tdist.Independent):
        raise ValueError(f"imputation needs a decoder that factorizes over features (an Independent "
                         f"distribution); {type(model).__name__}.decode gives {type(d).__name__}")
    base = d.base_dist
    return base.log_prob(x), base


@torch.no_grad()
def impute(model, guide, x: torch.Tensor, observed: torch.Tensor, num_steps: int = 500,
           burn_in: int = 100, seed: int = 0, method: str = "mwg") -> dict:
    """Missing features of x (where ``observed`` is False) from p(x_m | x_o), by the
    Metropolis-within-Gibbs sampler of Mattei & Frellsen 2018 ("Leveraging the exact likelihood
    of deep latent variable models"), with the guide as proposal. The chain on (z, x_m):

    1. propose z' ~ q(z | x_o, x_m) and accept it with probability
       min(1, p(x_o|z') p(z') q(z|x_o, x_m) / (p(x_o|z) p(z) q(z'|x_o, x_m)));
    2. draw x_m ~ p(x_m | z).

    Its stationary law is the exact p(z, x_m | x_o) for any guide with full support (the guide
    only sets the mixing speed). Missing features start at 0 (Mattei & Frellsen's choice).
    ``method="pseudo-gibbs"`` accepts every proposal (Rezende et al. 2014): the older scheme,
    which converges to the right law only when the guide is the exact posterior.

    Returns ``mean``: x with its missing features replaced by E[x_m | x_o], estimated as the
    average of the decoder mean E[x_m | z] over the steps after ``burn_in`` (Rao-Blackwellized);
    ``sample``: x with the last draw of x_m; ``acceptance``: the share of accepted proposals.
    """
    check_pair_for("imputation", model, guide)
    sites = tuple(getattr(model, "latent_sites", ("z",)))
    if not hasattr(model, "prior") or len(sites) != 1:
        raise ValueError(f"imputation needs a model of one latent site with its prior p(z) (prior(batch_shape)); "
                         f"{type(model).__name__} has latent sites {list(sites)}")
    observed = observed.to(device=x.device, dtype=torch.bool).expand_as(x)
    if method not in ("mwg", "pseudo-gibbs"):
        raise ValueError(f"unknown imputation method {method!r}; choose mwg or pseudo-gibbs")
    if not 0 <= burn_in < num_steps:
        raise ValueError(f"burn_in ({burn_in}) must be at least 0 and below num_steps ({num_steps})")
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        current = torch.where(observed, x, torch.zeros_like(x))
        n = x.shape[0]
        prior = model.prior((n,))

        def log_target(z, xc):  # log p(x_o | z) + log p(z)
            lp, _ = _observation_terms(model, z, xc)
            return torch.where(observed, lp, torch.zeros_like(lp)).sum(-1) + prior.log_prob(z)

        q = guide.posterior(current)
        z = q.sample()
        target = log_target(z, current)
        accepted, total = torch.zeros((), device=x.device), torch.zeros_like(x)
        for step in range(num_steps):
            q = guide.posterior(current)
            proposal = q.sample()
            proposal_target = log_target(proposal, current)
            log_ratio = proposal_target - target + q.log_prob(z) - q.log_prob(proposal)
            accept = torch.rand(n, device=x.device).log() < log_ratio
            if method == "pseudo-gibbs":
                accept = torch.ones_like(accept)
            z = torch.where(accept[:, None], proposal, z)
            target = torch.where(accept, proposal_target, target)
            accepted += accept.float().mean()
            _, px = _observation_terms(model, z, current)
            current = torch.where(observed, x, px.sample())
            if step >= burn_in:
                total += px.mean
    mean = total / (num_steps - burn_in)
    return {"mean": torch.where(observed, x, mean), "sample": current, "acceptance": float(accepted) / num_steps}


def missing_mask(n: int, x_dim: int, image_shape, pattern: str = "bottom-half", fraction: float = 0.5,
                 seed: int = 0) -> torch.Tensor:
    """Which features of n points are missing (True), shape (n, x_dim): ``bottom-half`` or
    ``right-half`` of each image (``image_shape`` (C, H, W)), or ``random``: each feature
    missing with probability ``fraction``, independently (missing completely at random)."""
    if pattern == "random":
        if not 0 < fraction < 1:
            raise ValueError(f"--fraction must lie strictly between 0 and 1, got {fraction}")
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, x_dim, generator=g) < fraction
    if pattern not in ("bottom-half", "right-half"):
        raise ValueError(f"unknown missing pattern {pattern!r}; choose bottom-half, right-half or random")
    if image_shape is None or len(image_shape) != 3 or math.prod(image_shape) != x_dim:
        raise ValueError(f"--missing {pattern} needs images, and this data is {x_dim} flat features; use --missing random")
    c, h, w = image_shape
    mask = torch.zeros(c, h, w, dtype=torch.bool)
    if pattern == "bottom-half":
        mask[:, h // 2:, :] = True
    else:
        mask[:, :, w // 2:] = True
    return mask.reshape(1, -1).expand(n, -1)


def imputation_error(truth: torch.Tensor, imputed: torch.Tensor, observed: torch.Tensor) -> float:
    """Root mean squared error over the missing features only."""
    missing = ~observed.to(device=truth.device, dtype=torch.bool).expand_as(truth)
    if not missing.any():
        raise ValueError("no feature is missing: nothing to score")
    return math.sqrt(float(((truth - imputed)[missing] ** 2).mean()))


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, weight_decay: float = 1e-3, max_iter: int = 200) -> float:
    """Test accuracy of multinomial logistic regression fitted on (train_features, train_labels):
    the usual probe of a representation (a linear read-out of what the features hold). Features
    are standardized with the training rows' mean and spread; the loss is the mean cross-entropy
    plus ``weight_decay`` * ||W||^2, minimized by L-BFGS (convex, so the answer is the optimum)."""
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("features and labels must have the same number of rows")
    with torch.no_grad():
        f_train, f_test = train_features.double(), test_features.double()
        loc = f_train.mean(0)
        scale = f_train.std(0).clamp(min=1e-6) if len(f_train) > 1 else torch.ones_like(loc)
        f_train, f_test = (f_train - loc) / scale, (f_test - loc) / scale
        classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight = torch.zeros(f_train.shape[1], classes, dtype=torch.float64, device=f_train.device, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, device=f_train.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")
    y = train_labels.long()

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(f_train @ weight + bias, y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return float(((f_test @ weight + bias).argmax(-1) == test_labels.long()).double().mean())


# ----------------------------------------------------------------------------------------------
# a run directory (what `pyro-vae impute` and `pyro-vae anomaly` call)


def open_run(run_dir, device: str = "auto", seed: int = 0, best: bool = False):
    """(config, model, guide) of a run on ``device`` with Pyro's RNG seeded: what every command
    that reads a run starts from."""
    import pyro

    from pyro_vae.run import load_run
    from pyro_vae.training import resolve_device

    pyro.set_rng_seed(seed)
    return load_run(run_dir, resolve_device(device), best=best)


def impute_run(run_dir, missing: str = "bottom-half", fraction: float = 0.5, n: int = 100, steps: int = 500,
               burn_in: int = 100, method: str = "mwg", seed: int = 0, device: str = "auto", figure=None,
               best: bool = False) -> dict:
    """``impute`` on the first n test points of a run with ``missing`` features removed; writes
    ``RUN/impute.json`` (RMSE beside the training-mean baseline, acceptance) and a figure
    (default ``RUN/figures/imputations.png``: input, truth, E[x_m | x_o], one draw)."""
    from pyro_vae.data import load_run_data
    from pyro_vae.plots import save_image_grid

    run_dir = Path(run_dir)
    config, model, guide = open_run(run_dir, device, seed, best)
    data = load_run_data(config, next(model.parameters()).device, test_size=n, train_size=None)
    x = data.test
    observed = ~missing_mask(len(x), x.shape[-1], config.image_shape, missing, fraction, seed).to(x.device)
    r = impute(model, guide, x, observed, steps, burn_in, seed, method)
    baseline = torch.where(observed, x, data.train.mean(0))
    shown = min(len(x), 16)
    rows = torch.cat([torch.where(observed, x, 0.5)[:shown], x[:shown], r["mean"][:shown], r["sample"][:shown]])
    figure = save_image_grid(rows, figure or run_dir / "figures" / "imputations.png", config.image_shape, nrow=shown,
                             title=f"input (missing grey), truth, E[x_m | x_o], one draw ({method})")
    result = {"method": method, "missing": missing, "fraction": fraction if missing == "random" else None,
              "points": len(x), "steps": steps, "burn_in": burn_in, "acceptance": r["acceptance"],
              "rmse_imputed_mean": imputation_error(x, r["mean"], observed),
              "rmse_training_mean": imputation_error(x, baseline, observed), "figure": str(figure)}
    (run_dir / "impute.json").write_text(json.dumps(result, indent=2))
    return result


def anomaly_run(run_dir, k: int = 100, data=None, test_size: int | None = None, seed: int = 0,
                device: str = "auto", figure=None, best: bool = False) -> dict:
    """``anomaly_scores`` of a run's whole test set (every class, even those left out of training
    with ``classes``) and, with ``data`` (a .npy/.pt file), of those points. Reports the AUROC of
    the classes not trained on against those trained on, and of ``data`` against the test set.
    Writes ``RUN/anomaly.json``, ``RUN/anomaly_scores.npz`` and a figure of the 32 test points
    that score highest (default ``RUN/figures/anomalies.png``)."""
    from pyro_vae.data import load_points, load_run_data
    from pyro_vae.plots import save_image_grid

    run_dir = Path(run_dir)
    config, model, guide = open_run(run_dir, device, seed, best)
    test = load_run_data(config, next(model.parameters()).device, test_size=test_size, all_classes=True)
    x = test.test
    points = None
    if data is not None:  # checked before the long scoring, so a wrong file fails at once
        points = load_points(data, x.shape[-1], getattr(model, "likelihood", None)).to(x.device)
    scores = anomaly_scores(model, guide, x, k, seed)
    result: dict = {"k": k, "test_points": len(x), "median_score": float(np.median(scores)),
                    "score_99th_percentile": float(np.percentile(scores, 99))}
    arrays = {"test_scores": scores}
    if config.classes is not None:
        normal = torch.isin(test.test_labels, torch.as_tensor(config.classes, device=x.device)).cpu().numpy()
        if normal.all():
            raise ValueError("the run was trained on every class in the test set: no class is left to detect")
        result.update(trained_classes=config.classes, normal_points=int(normal.sum()),
                      anomalous_points=int((~normal).sum()), auroc_other_classes=auroc(scores[normal], scores[~normal]))
        arrays["test_is_anomalous"] = ~normal
    if points is not None:
        arrays["data_scores"] = anomaly_scores(model, guide, points, k, seed)
        result.update(data=str(data), data_points=len(points), auroc_data=auroc(scores, arrays["data_scores"]))
    top = np.argsort(-scores)[:32]
    result["most_anomalous_test_points"] = top.tolist()
    figure = save_image_grid(x[torch.as_tensor(top.copy(), device=x.device)], figure or run_dir / "figures" / "anomalies.png",
                             config.image_shape, title=f"the 32 test points of highest -log p(x) (k={k})")
    result["figure"] = str(figure)
    np.savez(run_dir / "anomaly_scores.npz", **arrays)
    (run_dir / "anomaly.json").write_text(json.dumps(result, indent=2))
    return result


def represent_run(run_dir, labels=(100, 1000, 10000), seed: int = 0, device: str = "auto", best: bool = False) -> dict:
    """Representation learning: the test accuracy of a linear probe (``linear_probe``) on the
    codes E_q[z|x] of a run's training and test data, with ``labels`` labelled training rows each
    (balanced over classes), beside the same probe on the raw features. Writes
    ``RUN/represent.json``."""
    from pyro_vae.data import load_run_data

    run_dir = Path(run_dir)
    config, model, guide = open_run(run_dir, device, seed, best)
    check_pair_for("a representation", model, guide)
    data = load_run_data(config, next(model.parameters()).device, train_size=config.train_size)
    if data.train_labels is None or data.test_labels is None:
        raise ValueError(f"a linear probe needs labels, and {config.dataset!r} has none")
    codes_test = encode(guide, data.test)
    rows = []
    for n in labels:
        chosen = data.keep_labels(n, seed).labelled_rows
        x, y = data.batch(chosen), data.train_labels[chosen]  # binarized as in training, where it was
        rows.append({"labels": n,
                     "latent_accuracy": linear_probe(encode(guide, x), y, codes_test, data.test_labels),
                     "raw_accuracy": linear_probe(x, y, data.test, data.test_labels)})
    result = {"latent_dims": codes_test.shape[1], "raw_dims": data.train.shape[1], "test_points": len(data.test),
              "probe": "multinomial logistic regression, standardized features, L-BFGS, weight decay 1e-3",
              "rows": rows}
    (run_dir / "represent.json").write_text(json.dumps(result, indent=2))
    return result
