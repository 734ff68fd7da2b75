"""The run directory: config.json, checkpoint.pt (written atomically), best.pt (with a validation
split), metrics.jsonl, figures/."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from pyro_vae.config import TrainConfig, build_model_and_guide
from pyro_vae.errors import CheckpointError, RunDirError, UntrustedCodeError
from pyro_vae.files import atomic_write, save_tensors

CONFIG, CHECKPOINT, BEST, METRICS, FIGURES = "config.json", "checkpoint.pt", "best.pt", "metrics.jsonl", "figures"





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
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"it holds a JSON {type(saved).__name__}, not an object of settings")
        return TrainConfig.from_dict(saved)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is damaged or from another version: {e}") from None


def save_checkpoint(run_dir: Path, state: dict, name: str = CHECKPOINT) -> None:
    save_tensors(state, run_dir / name)


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


def load_run(run_dir: str | Path, device="cpu", best: bool = False, trust_code: bool = False):
    """(config, model, guide) of a trained run, in eval mode on ``device``: the last epoch's
    weights, or with ``best`` those of the best validation epoch (``best.pt``).

    A run whose config.json names its model or guide by import path is opened only with
    ``trust_code=True`` (see ``import_run_code``); built-in names need nothing."""
    config = load_config(run_dir)
    import_run_code(config, run_dir, trust_code)
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
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError as e:
        raise CheckpointError(f"{path} is damaged: {e}") from None
    if not all(isinstance(r, dict) and isinstance(r.get("epoch"), int) for r in rows):
        raise CheckpointError(f"{path} is damaged: each line must be a JSON object with an integer epoch")
    return rows


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write(run_dir / METRICS, lambda p: p.write_text(text))


# ----------------------------------------------------------------------------------------------
# trust: a run directory is data; the code it names is imported only when the user says so


def code_paths(config: TrainConfig) -> list[tuple[str, str]]:
    """(kind, name) of the config's names that are import paths, not built-ins: the model, the
    guide and the likelihood (estimators are registered names only)."""
    from pyro_vae.guides import GUIDES
    from pyro_vae.likelihoods import LIKELIHOODS
    from pyro_vae.models import MODELS

    named = (("model", config.model, MODELS), ("guide", config.guide, GUIDES),
             ("likelihood", config.likelihood or "", LIKELIHOODS))
    return [(kind, spec) for kind, spec, registry in named if spec not in registry and ":" in spec]


def import_run_code(config: TrainConfig, run_dir: str | Path, trust_code: bool = False) -> None:
    """Import the modules that a run's config.json names by import path, or refuse.

    Without ``trust_code`` an import path is refused (opening a run then imports nothing the
    user did not ask for, as Hugging Face's ``trust_remote_code``). With it, each module is
    imported from installed packages and PYTHONPATH only: never implicitly from the run
    directory or the current directory (``python -m`` puts the latter first on sys.path)."""
    paths = code_paths(config)
    if not paths:
        return
    if not trust_code:
        kind, spec = paths[0]
        raise UntrustedCodeError(
            f"{run_dir} names its {kind} by import path {spec!r}: opening it would import and run that code. "
            f"If you trust the run's author and have that package installed (or on PYTHONPATH), pass "
            f"--trust-code (trust_code=True from Python)")
    from pyro_vae.registry import import_object

    with without_implicit_paths(run_dir):
        for kind, spec in paths:
            module, _, attr = spec.partition(":")
            import_object(f"{module}:{attr.split('.')[0]}", kind, implicit_paths_removed=True)


@contextmanager
def without_implicit_paths(run_dir: str | Path):
    """sys.path without '', the current directory and ``run_dir`` (unless PYTHONPATH names them)."""
    def real(p):
        return os.path.realpath(p or os.curdir)

    explicit = {real(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    implicit = {real(os.curdir), real(run_dir)} - explicit
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if real(p) not in implicit]
    try:
        yield
    finally:
        added = [p for p in sys.path if p not in saved]
        sys.path[:] = saved + added


# ----------------------------------------------------------------------------------------------
# claiming a run directory: never overwrite a run unasked, one writer at a time

LOCK = ".lock"
RUN_FILES = (CONFIG, CHECKPOINT, METRICS)  # a folder holding any of these holds a run
# everything training and the commands that read a run write into it (removed by --overwrite)
WRITTEN = (CONFIG, CHECKPOINT, BEST, METRICS, FIGURES, "tensorboard", "standardization.pt", "eval.json",
           "eval_points.npz", "posterior.nc", "impute.json", "imputations.npy", "anomaly.json",
           "anomaly_scores.npz", "represent.json", "samples*.npy", "reconstructions.npy", "interpolations.npy",
           "traversals.npy", "latents.pt", "decoded.npy", "priors", ".*.tmp")


def holds_run(run_dir: str | Path) -> bool:
    return any((Path(run_dir) / name).exists() for name in RUN_FILES)


def claim_run_dir(run_dir: str | Path, overwrite: bool = False, resume: bool = False) -> RunClaim:
    """Check, before any work, that training may write ``run_dir``: a folder that holds a run
    needs ``resume`` (continue it) or ``overwrite`` (replace it), and no other live training may
    hold its lock. ``RunClaim.take`` then locks it, once there is something to write. Under
    torchrun only rank 0 checks (the others would see its lock and config.json)."""
    claim = RunClaim(Path(run_dir), overwrite, resume)
    if int(os.environ.get("RANK", "0")) == 0:
        claim.check()
    return claim


class RunClaim:
    """One training's hold on its run directory: ``RUN/.lock`` (pid and host) while it writes.

    ``take`` locks the folder (taking over the lock of a crashed training on this host, with a
    notice) and, with ``overwrite``, only then removes the old run's files; ``release`` removes
    the lock; ``discard`` removes what this training wrote when it saved no epoch."""

    def __init__(self, run_dir: Path, overwrite: bool = False, resume: bool = False):
        if overwrite and resume:
            raise RunDirError("--overwrite replaces a run and --resume continues it: give one of them")
        self.run_dir, self.overwrite, self.resume = run_dir, overwrite, resume
        self.created = self.held = self.taken = False
        self.saved_epoch: int | None = None  # the last epoch whose checkpoint is on disk
        self.text = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})

    @property
    def lock(self) -> Path:
        return self.run_dir / LOCK

    def check(self) -> None:
        if not str(self.run_dir).strip() or self.run_dir == Path():
            raise RunDirError("--out is empty: give the folder for the run, e.g. --out runs/mine")
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(f"--out {self.run_dir} is a file, not a folder: give a folder for the run")
        if not self.resume and not self.overwrite and holds_run(self.run_dir):
            raise RunDirError(f"{self.run_dir} already holds a run: continue it with `--resume {self.run_dir}`, "
                              f"or replace it with --overwrite (or train into another --out)")
        if not self.held and self.lock.exists() and _lock_alive(self.lock) is not False:
            raise RunDirError(_held_message(self.lock))

    def take(self) -> None:
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                _create_exclusive(self.lock, self.text)
                break
            except FileExistsError:
                if _lock_alive(self.lock) is not False:
                    raise RunDirError(_held_message(self.lock)) from None
                holder = _lock_holder(self.lock)
                print(f"pyro-vae: taking over {self.lock} of pid {holder.get('pid')}, which no longer runs "
                      f"(a training that stopped without cleaning up)", file=sys.stderr)
                self.lock.unlink(missing_ok=True)
        else:
            raise RunDirError(_held_message(self.lock))
        self.held = self.taken = True
        try:
            self.check()  # again, under the lock: another training may have finished meanwhile
        except RunDirError:
            self.release()
            raise
        if self.overwrite:
            remove_run_files(self.run_dir)

    def discard(self) -> bool:
        """Remove what this training wrote, if it saved no epoch (and the folder, if it made it)."""
        if not self.held or self.saved_epoch is not None or self.resume:
            return False
        remove_run_files(self.run_dir)
        self.release()
        if self.created:
            try:
                self.run_dir.rmdir()  # only if empty: nothing of the user's is ever removed
            except OSError:
                return False
        return True

    def release(self) -> None:
        if self.held:
            try:
                if self.lock.read_text() == self.text:
                    self.lock.unlink()
            except OSError:
                pass
            self.held = False


def remove_run_files(run_dir: Path) -> None:
    """Remove the files a run consists of (``WRITTEN``); other files in the folder stay."""
    for pattern in WRITTEN:
        for path in run_dir.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _create_exclusive(path: Path, text: str) -> None:
    """Create ``path`` holding ``text``, or raise FileExistsError: never a half-written lock."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    finally:
        tmp.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _lock_alive(lock: Path) -> bool | None:
    """Whether the lock's process still runs: None where this machine cannot tell (another host)."""
    holder = _lock_holder(lock)
    pid = holder.get("pid")
    if not lock.exists():
        return False
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _held_message(lock: Path) -> str:
    holder = _lock_holder(lock)
    who = f"pid {holder.get('pid')} on {holder.get('host')}"
    if _lock_alive(lock):
        return (f"{lock.parent} is being written by another training ({who}; {lock}): wait for it to finish "
                f"or stop it, or train into another --out")
    return (f"{lock.parent} is locked by {who} ({lock}), which this machine cannot check: if no training "
            f"writes this run, remove {lock}")
