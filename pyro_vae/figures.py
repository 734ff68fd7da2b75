"""The pictures of a trained run: prior samples, reconstructions, interpolations and latent
traversals (what ``pyro-vae sample``, ``reconstruct``, ``interpolate``, ``traverse`` and
``demo`` write). Image data gives image grids; other data gives scatter plots in the data's
own units, with the numbers also saved as ``.npy``.

Each function takes an opened run (``applications.open_run``: config, model, guide, device)
and returns what it wrote, as text to print.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pyro_vae.applications import (
    data_units,
    interpolate,
    is_image,
    most_active_dims,
    prior_samples,
    reconstruct,
    run_context,
    save_arrays,
    traverse,
)
from pyro_vae.errors import ConfigError
from pyro_vae.plots import save_image_grid, save_pairs, save_reconstructions
from pyro_vae.programs import context_keys
from pyro_vae.run import FIGURES


def run_test_data(config, device, n=None):
    """The run's test data: the first n points for images, all of them otherwise (the grey
    background of the scatter plots; callers take the first n)."""
    from pyro_vae.data import load_run_data

    return load_run_data(config, device, test_size=n if config.image_shape else None)


def sample_figure(run_dir, opened, n: int = 64, label: int | None = None, out=None) -> str:
    """``n`` draws x ~ p(x|z), z ~ p(z) (decoded means), of class ``label`` for a conditional
    model (else classes by column) -> RUN/figures/samples.png."""
    config, model, guide, device = opened
    conditional = "y" in context_keys(model, guide)
    if label is not None and not conditional:
        raise ConfigError(f"--label needs a class-conditional model (cvae, ssvae); this run's model is {config.model!r}")
    if conditional and label is not None and not 0 <= label < (config.num_classes or 0):
        raise ConfigError(f"--label {label} is not a class of this run: choose 0..{(config.num_classes or 1) - 1}")
    data = run_test_data(config, device, 1)
    run_context(model, guide, data)  # a context other than labels is refused here, by name
    context = {}
    if conditional:
        y = torch.arange(n, device=device) % (config.num_classes or 1) if label is None else \
            torch.full((n,), label, device=device)
        context = {"y": y}
    stem = "samples" if label is None else f"samples-label{label}"
    out = Path(out or Path(run_dir) / FIGURES / f"{stem}.png")
    x = prior_samples(model, n, data.test, **context)
    what = f"class {label}" if label is not None else ("classes 0, 1, ... by column" if conditional else "the prior")
    if is_image(config, x.shape[-1]):
        save_image_grid(x, out, config.image_shape, title=f"{n} samples from {what}")
        return str(out)
    x, grey = data_units(data, x), data_units(data, data.test)
    arrays = save_arrays(Path(run_dir) / f"{stem}.npy", x)
    save_pairs(out, grey, {"E[x | z], z ~ p(z)": x}, title=f"{n} samples from {what} (colour), test points (grey)")
    return f"{out} {arrays}"


def reconstruction_figure(run_dir, opened, n: int = 32, out=None) -> str:
    """The first ``n`` test points beside E[x' | z = E_q[z|x]] -> RUN/figures/reconstructions.png."""
    config, model, guide, device = opened
    data = run_test_data(config, device, n)
    x = data.test[:n]
    recon = reconstruct(model, guide, x, **run_context(model, guide, data, rows=slice(0, n)))
    out = Path(out or Path(run_dir) / FIGURES / "reconstructions.png")
    if is_image(config, x.shape[-1]):
        save_reconstructions(x, recon, out, config.image_shape)
        return str(out)
    x, recon = data_units(data, x), data_units(data, recon)
    arrays = save_arrays(Path(run_dir) / "reconstructions.npy", recon)
    save_pairs(out, x, {"E[x' | z = E_q[z|x]]": recon},
               title=f"{len(x)} test points (grey) and their reconstructions (colour)")
    return f"{out} {arrays}"


def interpolation_figure(run_dir, opened, pairs: int = 8, steps: int = 10, method: str = "slerp", out=None) -> str:
    """Decoded paths between the codes of ``pairs`` test pairs -> RUN/figures/interpolations.png."""
    config, model, guide, device = opened
    data = run_test_data(config, device, 2 * pairs)
    x = data.test[: 2 * pairs]
    if len(x) < 2:
        raise ConfigError("interpolation needs at least two test points")
    half = len(x) // 2
    a, b = torch.arange(0, 2 * half, 2, device=x.device), torch.arange(1, 2 * half, 2, device=x.device)
    path = interpolate(model, guide, x[a], x[b], steps, method,
                       context_b=run_context(model, guide, data, rows=b), **run_context(model, guide, data, rows=a))
    out = Path(out or Path(run_dir) / FIGURES / "interpolations.png")
    if is_image(config, x.shape[-1]):
        rows = torch.cat([x[a][:, None], path, x[b][:, None]], 1).reshape(-1, x.shape[-1])
        save_image_grid(rows, out, config.image_shape, nrow=steps + 2,
                        title=f"test pairs (first and last column) and the decoded {method} path between their codes")
        return str(out)
    path, ends = data_units(data, path), data_units(data, torch.cat([x[a], x[b]]))
    arrays = save_arrays(Path(run_dir) / "interpolations.npy", path)
    save_pairs(out, data_units(data, data.test), {f"decoded {method} paths": path, "end points": ends},
               title=f"{half} paths between the codes of test pairs (colour), test points (grey)")
    return f"{out} {arrays}"


def traversal_figure(run_dir, opened, index: int = 0, dims=None, num_dims: int = 8, span: float = 3.0,
                     steps: int = 9, out=None) -> str:
    """Test point ``index`` decoded as each of ``dims`` (default: the ``num_dims`` most active)
    runs from -span to span, the others held at E_q[z|x] -> RUN/figures/traversals.png."""
    config, model, guide, device = opened
    data = run_test_data(config, device, max(1000, index + 1))
    x = data.test
    if not 0 <= index < len(x):
        raise ConfigError(f"--index {index} is not a test point: the test set has {len(x)}")
    first = slice(0, 1000)
    dims = dims or most_active_dims(model, guide, x[first], num_dims, **run_context(model, guide, data, rows=first))
    row = slice(index, index + 1)
    grid = traverse(model, guide, x[row], dims, span, steps, **run_context(model, guide, data, rows=row))[0]
    out = Path(out or Path(run_dir) / FIGURES / "traversals.png")
    if is_image(config, x.shape[-1]):
        save_image_grid(grid.reshape(-1, x.shape[-1]), out, config.image_shape, nrow=steps,
                        title=f"test point {index}: latent dims {dims} (rows) from -{span:g} to {span:g}")
        return f"{out} (rows: dimensions {' '.join(map(str, dims))})"
    grid, x = data_units(data, grid), data_units(data, x)
    arrays = save_arrays(Path(run_dir) / "traversals.npy", grid)
    layers = {f"latent dim {d}": grid[i : i + 1] for i, d in enumerate(dims)}
    save_pairs(out, x, {**layers, f"test point {index}": x[row]},
               title=f"test point {index}: each latent dim from -{span:g} to {span:g} (colour)")
    return f"{out} {arrays} (dims, steps, features; dims {' '.join(map(str, dims))})"
