"""What happens around the training loop: saving, early stopping, printing, TensorBoard.

A callback is any object with some of the methods of ``Callback`` (the hooks of pythae's
``TrainingCallback`` and Lightning's ``Callback``, reduced to the three a VAE loop needs). Pass
your own to ``pyro_vae.train(config, run, callbacks=[...])``; they run after the built-in ones,
on every process of a distributed run (``state.is_main`` is true on the one that writes).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pyro_vae.errors import ConfigError, RunDirError
from pyro_vae.run import (
    BEST,
    RunClaim,
    best_epoch,
    rng_state,
    save_checkpoint,
    save_config,
    write_metrics,
)


@dataclass
class TrainingState:
    """What a callback sees. ``metrics`` holds one row per finished epoch (the last is this
    epoch's); setting ``stop = True`` ends training after the current epoch."""

    config: Any
    run_dir: Path
    model: torch.nn.Module
    guide: torch.nn.Module
    optimizer: torch.optim.Optimizer
    world: Any
    claim: RunClaim
    epoch: int = 0
    metrics: list[dict] = field(default_factory=list)
    kl_weights: dict = field(default_factory=dict)  # the KL schedule's weights at the epoch's last step
    stop: bool = False
    quiet: bool = False

    @property
    def is_main(self) -> bool:
        return self.world.is_main


class Callback:
    """The hooks, each a no-op here: subclass and override the ones you need."""

    def on_train_start(self, state: TrainingState) -> None:
        """Before the first epoch (of this call: a resumed run's metrics are already there)."""

    def on_epoch_end(self, state: TrainingState, row: dict) -> None:
        """After each epoch: ``row`` is its metrics line (also ``state.metrics[-1]``)."""

    def on_train_end(self, state: TrainingState) -> None:
        """After the last epoch (or early stopping)."""


class SaveCheckpoint(Callback):
    """metrics.jsonl, checkpoint.pt (model, guide, optimizer, epoch, KL schedule, every process's
    RNG state) and, when this epoch is the best by the validation split, best.pt; each written
    atomically by the main process. A write that fails (a full disk, a folder made read-only)
    stops training with one line: the previous epoch's checkpoint is intact, and resumable."""

    def on_epoch_end(self, state: TrainingState, row: dict) -> None:
        rng = state.world.gather(rng_state())  # one per process: a resumed run draws what it would have
        if state.is_main:
            self._save(state, {"model": state.model.state_dict(), "guide": state.guide.state_dict(),
                               "optimizer": state.optimizer.state_dict(), "epoch": state.epoch, "rng": rng,
                               "schedule": {**state.kl_weights, "progress_epochs": float(state.epoch)}})
        state.claim.saved_epoch = state.epoch
        state.world.barrier()

    @staticmethod
    def _save(state: TrainingState, checkpoint: dict) -> None:
        run_dir, claim = state.run_dir, state.claim
        try:
            write_metrics(run_dir, state.metrics)
            save_checkpoint(run_dir, checkpoint)
            save_config(run_dir, state.config)  # the settings this epoch ran with (a resume may change some)
            best = best_epoch(state.metrics)
            if best is not None and best[0] == state.epoch:
                save_checkpoint(run_dir, {"model": checkpoint["model"], "guide": checkpoint["guide"],
                                          "epoch": state.epoch, "criterion": best[1], "value": best[2]}, BEST)
        except OSError as e:
            kept = (f"the checkpoint of epoch {claim.saved_epoch} is intact: free space (or fix the folder) and "
                    f"continue with `pyro-vae train --resume {run_dir} --epochs {state.config.epochs}`" if claim.saved_epoch is not None
                    else "no epoch had been saved, so there is nothing to resume")
            raise RunDirError(f"cannot save epoch {state.epoch}: {e.strerror}: {e.filename}; {kept}") from None


class EarlyStopping(Callback):
    """Stop once the best validation epoch lies ``patience`` epochs back (its weights are in
    best.pt); a resumed run that had already stopped trains no further."""

    def __init__(self, patience: int):
        self.patience = patience

    def spent(self, metrics: list[dict]) -> bool:
        best = best_epoch(metrics) if metrics else None
        return best is not None and metrics[-1]["epoch"] - best[0] >= self.patience

    def on_train_start(self, state: TrainingState) -> None:
        state.stop = state.stop or self.spent(state.metrics)

    def on_epoch_end(self, state: TrainingState, row: dict) -> None:
        if self.spent(state.metrics):
            state.stop = True
            if state.is_main and not state.quiet:
                epoch, criterion, value = best_epoch(state.metrics)
                print(f"early stopping after epoch {state.epoch}: no better {criterion} than epoch {epoch}'s "
                      f"{value:.4f} for {self.patience} epochs; its weights are in {state.run_dir / BEST}",
                      file=sys.stderr)


class PrintEpochs(Callback):
    """One line per epoch on stderr: train, test (and validation) loss, KL weights, time."""

    def on_epoch_end(self, state: TrainingState, row: dict) -> None:
        if not state.is_main or state.quiet:
            return
        extra = f"  valid {row['valid_loss']:.2f}" if "valid_loss" in row else ""
        weights = "  ".join(f"{k} {v:.3g}" for k, v in state.kl_weights.items())
        print(f"epoch {state.epoch:3d}  train {row['train_loss']:.2f}  test {row['test_loss']:.2f}{extra}  "
              f"{weights}  {row['epoch_time_s']:.1f}s", file=sys.stderr)


class TensorBoard(Callback):
    """``--tensorboard``: every numeric metric per epoch, and a grid of samples from the prior
    where the model has ``sample(n)`` (``pip install 'pyro-vae[tensorboard]'``)."""

    def __init__(self, run_dir: Path, image_shape):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'pyro-vae[tensorboard]' "
                              "(or train without --tensorboard; metrics.jsonl has the same figures)") from None
        self.writer, self.image_shape = SummaryWriter(str(run_dir / "tensorboard")), image_shape

    def on_epoch_end(self, state: TrainingState, row: dict) -> None:
        if not state.is_main:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, state.epoch)
        if self.image_shape and hasattr(state.model, "sample"):
            from pyro_vae.plots import image_grid

            try:
                images = state.model.sample(64).reshape(-1, *self.image_shape).clamp(0, 1)
            except TypeError:  # conditional models need their context to sample
                images = None
            if images is not None:
                grid = image_grid(images, nrow=8)
                self.writer.add_image("samples", grid.expand(3, -1, -1) if len(grid) == 1 else grid, state.epoch)  # RGB
        self.writer.flush()
