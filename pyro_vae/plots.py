"""Figures written as PNG files: image grids, reconstructions, scatter plots of pairs of features
(for data that are not images), training curves, evaluation diagnostics (KL per latent
dimension, Pareto k-hat)."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from pyro_vae.errors import ConfigError
from pyro_vae.files import atomic_write


def _as_images(x: torch.Tensor, image_shape) -> torch.Tensor:
    if image_shape is None:
        side = int(round(x.shape[-1] ** 0.5))
        if side * side != x.shape[-1]:
            raise ConfigError(f"cannot show {x.shape[-1]} features as an image; give image_shape")
        image_shape = (1, side, side)
    return x.detach().float().cpu().reshape(-1, *image_shape).clamp(0, 1)


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """(N, C, H, W) images tiled ``nrow`` to a row into one (C, H', W') image with ``padding``
    pixels of ``pad_value`` around each (the layout of torchvision's ``make_grid``, without
    importing torchvision, which costs seconds)."""
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = images.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for i, image in enumerate(images):
        top, left = (i // cols) * (h + padding) + padding, (i % cols) * (w + padding) + padding
        grid[:, top:top + h, left:left + w] = image
    return grid


def save_image_grid(x: torch.Tensor, path: str | Path, image_shape=None, nrow: int = 8,
                    title: str | None = None, row_labels=None) -> Path:
    """Save rows of flat images as one grid PNG; ``row_labels`` are written left of the rows."""
    images = _as_images(x, image_shape)
    grid = image_grid(images, nrow=nrow)
    fig, ax = _subplots(figsize=(grid.shape[2] / 40, grid.shape[1] / 40 + (0.4 if title else 0)))
    pixels = grid[0] if grid.shape[0] == 1 else grid.permute(1, 2, 0)  # grey: one channel with the grey colormap
    ax.imshow(pixels.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    height = images.shape[-2] + 2
    for r, label in enumerate(row_labels or ()):
        ax.text(-2, 2 + r * height + images.shape[-2] / 2, label, ha="right", va="center", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def save_reconstructions(x: torch.Tensor, recon: torch.Tensor, path: str | Path, image_shape=None,
                         nrow: int = 8) -> Path:
    """Originals (odd rows) above their reconstructions (even rows)."""
    pairs = []
    for i in range(0, len(x), nrow):
        pairs += [x[i : i + nrow], recon[i : i + nrow]]
    return save_image_grid(torch.cat(pairs), path, image_shape, nrow,
                           title="originals (odd rows) and reconstructions (even rows)")


PAIR_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple")


def save_pairs(path: str | Path, data: torch.Tensor, layers: dict, dims: int = 4, title: str | None = None,
               max_points: int = 2000) -> Path:
    """Scatter plots of pairs of the first ``dims`` features, for data that are not images: one
    panel for 2 features, a pair grid (feature i against feature j, i < j) for more, feature 0
    against its index for 1. ``data`` (N, D) in grey; each of ``layers`` ({label: points (M, D),
    or paths (rows, steps, D), drawn as lines}) in colour. At most ``max_points`` grey points."""
    data = data.detach().float().cpu().reshape(len(data), -1)[:max_points]
    d = min(dims, data.shape[-1])
    pairs = [(i, j) for i in range(d) for j in range(i + 1, d)] if d > 1 else [(None, 0)]
    if len(pairs) == 1:
        fig, axes = _subplots(1, 1, figsize=(5, 4.6), squeeze=False)
        panels = [(axes[0, 0], pairs[0])]
    else:
        fig, axes = _subplots(d - 1, d - 1, figsize=(3 * (d - 1), 3 * (d - 1)), squeeze=False)
        panels = []
        for r in range(d - 1):
            for c in range(d - 1):
                if c > r:
                    axes[r, c].axis("off")
                else:
                    panels.append((axes[r, c], (c, r + 1)))

    def coords(t, pair):
        i, j = pair
        return (torch.arange(t.shape[-2]).expand(t.shape[:-1]) if i is None else t[..., i]), t[..., j]

    for ax, pair in panels:
        ax.scatter(*coords(data, pair), s=4, c="0.7", label="data", rasterized=True)
        for (label, t), colour in zip(layers.items(), PAIR_COLOURS * 4):
            t = t.detach().float().cpu()
            if t.dim() == 3:  # paths: one line per row
                for k, row in enumerate(t):
                    ax.plot(*coords(row, pair), "-o", ms=2.5, lw=1, color=colour, label=label if k == 0 else None)
            else:
                ax.scatter(*coords(t.reshape(len(t), -1), pair), s=8, color=colour, label=label)
        ax.set_xlabel("row" if pair[0] is None else f"feature {pair[0]}")
        ax.set_ylabel(f"feature {pair[1]}")
        ax.grid(alpha=0.3)
    panels[0][0].legend(fontsize=7, markerscale=2)
    if data.shape[-1] > d:
        title = f"{title or ''} (features 0-{d - 1} of {data.shape[-1]})".strip()
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def save_training_curve(metrics: list[dict], path: str | Path) -> Path:
    """Train and test loss (negative bound, nats per data point) against epoch."""
    fig, ax = _subplots(figsize=(6, 4))
    epochs = [m["epoch"] for m in metrics]
    for key in ("train_loss", "valid_loss", "test_loss"):
        if metrics and key in metrics[0]:
            ax.plot(epochs, [m[key] for m in metrics], marker="o", ms=3, label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative bound (nats per data point)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def save_bound_curves(curves: dict[str, list[tuple[int, float]]], path: str | Path) -> Path:
    """Test bound (nats per data point) against epoch, one line per estimator."""
    fig, ax = _subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([e for e, _ in points], [v for _, v in points], marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test bound (nats per data point)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def save_snr_against_k(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Gradient SNR of model and guide against K (log-log), one line per estimator family."""
    fig, axes = _subplots(1, 2, figsize=(9, 3.6))
    for ax, part in zip(axes, ("model", "guide")):
        for name in dict.fromkeys(r["estimator"] for r in rows):
            pts = [(r["K"], r[f"{part}_snr"]) for r in rows if r["estimator"] == name]
            ax.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("particles K")
        ax.set_ylabel(f"{part} gradient SNR")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def save_kl_per_dim(kl_per_dim: dict[str, list[float]], path: str | Path) -> Path:
    """KL(q || p) per latent dimension (nats), one bar chart panel per latent site, sorted."""
    fig, axes = _subplots(1, len(kl_per_dim), figsize=(6 * len(kl_per_dim), 3.5), squeeze=False)
    for ax, (site, values) in zip(axes[0], kl_per_dim.items()):
        values = sorted(values, reverse=True)
        ax.bar(range(len(values)), values, width=1.0, color="tab:blue")
        ax.set_xlabel(f"{site} dimension (sorted)")
        ax.set_ylabel("KL (nats)")
        ax.set_title(f"{site}: total {sum(values):.2f} nats", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def save_khat_histogram(khat, path: str | Path, bad: float = 0.7) -> Path:
    """Histogram of PSIS Pareto k-hat over data points, with the 0.5 and ``bad`` thresholds."""
    import numpy as np

    khat = np.asarray(khat, dtype=float)
    khat = khat[np.isfinite(khat)]
    fig, ax = _subplots(figsize=(6, 3.5))
    ax.hist(khat, bins=40, color="tab:blue")
    for t, style in ((0.5, ":"), (bad, "--")):
        ax.axvline(t, color="tab:red", ls=style, label=f"k = {t}")
    ax.set_xlabel("Pareto k-hat of the importance weights")
    ax.set_ylabel("data points")
    ax.set_title(f"{np.mean(khat > bad):.1%} of {len(khat)} points above {bad}", fontsize=9)
    ax.legend()
    return _save(fig, path)


def _subplots(*grid, figsize, **kw):
    """(figure, axes) drawn without pyplot: no global backend is chosen or switched (a notebook
    keeps its own), and no figure is left open."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kw)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format=path.suffix.lstrip(".") or "png"))
    return path
