"""The run directory: config.json, checkpoint.pt (written atomically), best.pt (with a validation
split), metrics.jsonl, figures/."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import torch

from pyro_vae.config import TrainConfig, build_model_and_guide

CONFIG, CHECKPOINT, BEST, METRICS, FIGURES = "config.json", "checkpoint.pt", "best.pt", "metrics.jsonl", "figures"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, or not a pyro-vae checkpoint."""


def atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_config(run_dir: Path, config: TrainConfig) -> None:
    text = json.dumps(config.to_dict(), indent=2)
    atomic_write(run_dir / CONFIG, lambda p: p.write_text(text))


def load_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise CheckpointError(f"{run_dir} is not a run directory: it has no {CONFIG}. "
                              f"Pass the folder that `pyro-vae train --out` wrote.")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is damaged or from another version: {e}") from e


def save_checkpoint(run_dir: Path, state: dict) -> None:
    atomic_write(run_dir / CHECKPOINT, lambda p: torch.save(state, p))


def best_epoch(metrics: list[dict]) -> tuple[int, str, float] | None:
    """(epoch, criterion, value) of the best epoch by the validation split: the highest
    ``valid_accuracy`` where the guide classifies (ssvae), else the lowest ``valid_loss``;
    None without a validation split. Ties go to the earlier epoch."""
    if any("valid_accuracy" in m for m in metrics):
        row = max(metrics, key=lambda m: (m.get("valid_accuracy", -1.0), -m["epoch"]))
        return row["epoch"], "valid_accuracy", row["valid_accuracy"]
    rows = [m for m in metrics if "valid_loss" in m]
    if not rows:
        return None
    row = min(rows, key=lambda m: (m["valid_loss"], m["epoch"]))
    return row["epoch"], "valid_loss", row["valid_loss"]


def load_checkpoint(run_dir: str | Path, map_location="cpu", best: bool = False) -> dict:
    path = Path(run_dir) / (BEST if best else CHECKPOINT)
    if best and not path.exists():
        raise CheckpointError(f"no {BEST} in {run_dir}: it is kept only for runs with a validation split; "
                              f"train with --validation N (or leave out --best)")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the run has not finished an epoch yet.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        # torch's weights-only UnpicklingError text suggests weights_only=False, which is no fix
        # for a damaged file (and would run arbitrary code): say what failed, not that.
        detail = ("it does not unpickle as tensors" if isinstance(e, pickle.UnpicklingError)
                  else ": ".join(filter(None, [type(e).__name__, _first_sentence(str(e))])))
        raise CheckpointError(
            f"cannot read checkpoint {path}: {detail}. The file is damaged "
            f"or not a pyro-vae checkpoint; retrain the run (or restore the file from a backup)."
        ) from e
    missing = {"model", "guide", "epoch"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise CheckpointError(f"{path} is not a pyro-vae checkpoint: it lacks {sorted(missing)}")
    return state


def _first_sentence(text: str, limit: int = 200) -> str:
    first_line = (text.strip().splitlines() or [""])[0]
    return first_line.split(". ")[0][:limit].rstrip(".")


def load_run(run_dir: str | Path, device="cpu", best: bool = False):
    """(config, model, guide) of a trained run, in eval mode on ``device``: the last epoch's
    weights, or with ``best`` those of the best validation epoch (``best.pt``)."""
    config = load_config(run_dir)
    state = load_checkpoint(run_dir, map_location=device, best=best)
    model, guide = build_model_and_guide(config)
    bind_for_loading(model, guide, config)
    try:
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint in {run_dir} does not fit its config.json: {e}") from e
    return config, model.to(device).eval(), guide.to(device).eval()


def bind_for_loading(model, guide, config: TrainConfig) -> None:
    """Find the parameters of programs that keep them in Pyro's param store (functions using
    ``pyro.param``/``pyro.module``) by tracing them on two placeholder rows, so that
    ``load_state_dict`` has somewhere to put them."""
    import pyro

    from pyro_vae.programs import Program, bind, context_keys

    if not any(isinstance(p, Program) for p in (model, guide)):
        return
    pyro.clear_param_store()
    x = torch.zeros(2, config.x_dim)
    context = {k: torch.zeros(2, dtype=torch.long) for k in context_keys(model, guide)}
    bind(model, guide, x, **context)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write(run_dir / METRICS, lambda p: p.write_text(text))
