"""The one SVI loop: every model, guide and estimator trains here.

Per step: a batch from a random permutation (binarized afresh where the dataset asks),
loss = Objective(x, beta) (the estimator's differentiable_loss per data point), backward,
optional gradient clipping, optimizer step. Per epoch: the test loss, one metrics line, and
an atomic checkpoint. Losses are read back to the host once per epoch (and every
``log_every`` steps while a progress bar shows), never inside the step.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from pyro_vae.config import TrainConfig, build_model_and_guide
from pyro_vae.data import Dataset, batch_indices, load_dataset
from pyro_vae.objectives import Objective, check_pair, make_estimator
from pyro_vae.run import (
    FIGURES,
    load_checkpoint,
    read_metrics,
    rng_state,
    save_checkpoint,
    save_config,
    set_rng_state,
    write_metrics,
)
from pyro_vae.schedules import KLSchedule


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} asked for CUDA, but torch sees no GPU; use --device cpu")
    return dev


@torch.no_grad()
def mean_loss(objective: Objective, x: torch.Tensor, batch_size: int = 1000) -> float:
    """The objective (at beta = 1) averaged over every row of x."""
    total = torch.zeros((), device=x.device)
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        total += objective(chunk) * len(chunk)
    return float(total) / len(x)


def _diverged(epoch: int, step: int, loss: float, run_dir: Path, config: TrainConfig) -> TrainingDiverged:
    hints = ["a lower --lr (now %g)" % config.lr]
    if not config.clip_grad:
        hints.append("--clip-grad 10")
    if config.likelihood == "gaussian":
        hints.append("a less flexible likelihood (the learned Gaussian scale can collapse)")
    return TrainingDiverged(
        f"training diverged: the loss is {loss} at epoch {epoch}, step {step}. The last good "
        f"checkpoint (epoch {epoch - 1}) is kept in {run_dir}. Try {', '.join(hints)}, then "
        f"`pyro-vae train --resume {run_dir}`."
    )


def train(
    config: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    quiet: bool = False,
    dataset: Dataset | None = None,
    log_every: int = 50,
) -> list[dict]:
    """Train (or, with ``resume``, continue) a run in ``run_dir``; returns the metrics rows."""
    run_dir = Path(run_dir)
    (run_dir / FIGURES).mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    pyro.set_rng_seed(config.seed)
    pyro.clear_param_store()

    if dataset is None:
        dataset = load_dataset(config.dataset, device, config.data_dir, config.validation,
                               config.train_size, config.test_size, config.image_size)
    config.x_dim = dataset.x_dim
    config.image_shape = list(dataset.image_shape) if dataset.image_shape else None
    model, guide = build_model_and_guide(config, dataset.train_mean())
    model.to(device), guide.to(device)
    if hasattr(model, "likelihood"):
        model.likelihood.check_support(dataset.train, "training data")
        model.likelihood.check_support(dataset.test, "test data")
    objective = Objective(model, guide, make_estimator(config.estimator, config.particles))
    check_pair(model, guide, dataset.train[:2])
    optimizer = torch.optim.Adam(objective.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = KLSchedule(config.beta, config.warmup_epochs)

    start_epoch, metrics = 1, []
    if resume:
        state = load_checkpoint(run_dir, map_location=device)
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the config's rate wins (stage-wise schedules)
            group["lr"] = config.lr
        set_rng_state(state["rng"])
        start_epoch = state["epoch"] + 1
        metrics = [m for m in read_metrics(run_dir) if m["epoch"] <= state["epoch"]]
    save_config(run_dir, config)

    params = list(objective.parameters())
    show = not quiet and sys.stderr.isatty()
    for epoch in range(start_epoch, config.epochs + 1):
        t0 = time.perf_counter()
        objective.train()
        batches = batch_indices(len(dataset.train), config.batch_size, device)
        total = torch.zeros((), device=device)
        grad_norm = torch.zeros((), device=device)
        bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", disable=not show, leave=False)
        for step, index in enumerate(bar, 1):
            beta = schedule(epoch - 1 + step / len(batches))
            loss = objective(dataset.batch(index), beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
            optimizer.step()
            total += loss.detach()
            if show and step % log_every == 0:
                value = float(loss)
                if not math.isfinite(value):
                    raise _diverged(epoch, step, value, run_dir, config)
                bar.set_postfix(loss=f"{value:.2f}", beta=f"{beta:.3g}")
        train_loss = float(total) / len(batches)
        if not math.isfinite(train_loss):
            raise _diverged(epoch, len(batches), train_loss, run_dir, config)
        objective.eval()
        row = {"epoch": epoch, "train_loss": train_loss, "test_loss": mean_loss(objective, dataset.test),
               "epoch_time_s": time.perf_counter() - t0, "beta": beta, "lr": config.lr}
        if dataset.valid is not None:
            row["valid_loss"] = mean_loss(objective, dataset.valid)
        if config.clip_grad:
            row["grad_norm"] = float(grad_norm)
        metrics.append(row)
        write_metrics(run_dir, metrics)
        save_checkpoint(run_dir, {
            "model": model.state_dict(), "guide": guide.state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": epoch, "rng": rng_state(),
            "schedule": {"beta": beta, "progress_epochs": float(epoch)},
        })
        if not quiet:
            extra = f"  valid {row['valid_loss']:.2f}" if "valid_loss" in row else ""
            print(f"epoch {epoch:3d}  train {train_loss:.2f}  test {row['test_loss']:.2f}{extra}  "
                  f"beta {beta:.3g}  {row['epoch_time_s']:.1f}s", file=sys.stderr)
    return metrics

