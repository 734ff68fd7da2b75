"""Run directories are safe to open and lose nothing: trust for the code a run names, no run
overwritten unasked, one writer at a time, interrupt and divergence messages that tell the truth,
and a resume that honours the flags it may and refuses the others."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pyro_vae
from pyro_vae.cli import main
from pyro_vae.config import TrainConfig
from pyro_vae.run import RunDirError, UntrustedCodeError, load_checkpoint, load_run, read_metrics
from pyro_vae.training import TrainingDiverged, TrainingInterrupted, train

ROOT = Path(__file__).resolve().parent.parent


def points(path: Path, n: int = 400) -> Path:
    g = torch.Generator().manual_seed(0)
    np.save(path, (torch.randn(n, 2, generator=g) * torch.tensor([1.0, 2.0])).numpy().astype(np.float32))
    return path


def config(data: Path, **kw) -> TrainConfig:
    base = dict(dataset=str(data), likelihood="gaussian", z_dim=2, hidden=[16], epochs=1, batch_size=50,
                device="cpu", estimator="elbo")
    return TrainConfig(**{**base, **kw})


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    train(config(points(tmp_path / "x.npy")), run, quiet=True)
    return run


# ----------------------------------------------------------------------------------------------
# trust

EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nclass Model:\n    pass\n"


def test_opening_a_run_never_imports_code_unasked(run, tmp_path):
    """A run naming ``evil_mod:Model``, with evil_mod.py in the run and in the current directory
    (first on sys.path under ``python -m``): refused without --trust-code, and not found with it."""
    marker = tmp_path / "marker"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for folder in (run, cwd):
        (folder / "evil_mod.py").write_text(EVIL.format(marker=str(marker)))
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "model": "evil_mod:Model"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in (["eval", run, "--k", 2], ["sample", run], ["train", "--resume", run, "--epochs", 2]):
        p = subprocess.run([sys.executable, "-m", "pyro_vae", *map(str, command)], cwd=cwd, env=env,
                           capture_output=True, text=True)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert "'evil_mod:Model'" in p.stderr and "--trust-code" in p.stderr
        assert not marker.exists()
        p = subprocess.run([sys.executable, "-m", "pyro_vae", *map(str, command), "--trust-code"], cwd=cwd,
                           env=env, capture_output=True, text=True)
        assert p.returncode == 2 and "cannot import module 'evil_mod'" in p.stderr, p.stderr
        assert not marker.exists()  # never from the run directory or the current directory
    with pytest.raises(UntrustedCodeError, match=r"'evil_mod:Model'.*--trust-code"):
        load_run(run)
    assert not marker.exists()


@pytest.mark.parametrize("spec", ["torch.hub:load", "os:system", "builtins:eval"])
def test_any_import_path_in_a_run_needs_trust(run, spec):
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "guide": spec, "guide_options": {"repo_or_dir": str(run)}}))
    with pytest.raises(UntrustedCodeError, match=f"guide by import path '{spec}'"):
        load_run(run)
    for command in ("eval", "sample", "reconstruct", "interpolate", "traverse", "impute", "anomaly", "represent"):
        assert cli(command, run) == 2


def test_trusted_import_paths_load(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "programs"))
    data = points(tmp_path / "x.npy")
    run = tmp_path / "run"
    train(config(data, model="functional:model", guide="functional:guide"), run, quiet=True)  # the user asks
    with pytest.raises(UntrustedCodeError):
        pyro_vae.load_run(run)
    pyro_vae.load_run(run, trust_code=True)
    assert cli("train", "--resume", run, "--epochs", 2, "--quiet") == 2
    assert cli("train", "--resume", run, "--epochs", 2, "--quiet", "--trust-code") == 0
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]


# ----------------------------------------------------------------------------------------------
# no run overwritten unasked; one writer


def test_train_out_on_a_run_refuses_unless_resume_or_overwrite(run, capsys):
    before = (run / "checkpoint.pt").read_bytes()
    data = run.parent / "x.npy"
    common = ["--dataset", data, "--likelihood", "gaussian", "--z-dim", 2, "--hidden", 16, "--device", "cpu",
              "--quiet", "--out", run]
    for epochs in (1, 3):
        assert cli("train", *common, "--epochs", epochs) == 2
        err = capsys.readouterr().err.strip()
        assert "already holds a run" in err and "--resume" in err and "--overwrite" in err and "\n" not in err
        assert (run / "checkpoint.pt").read_bytes() == before
    (run / "notes.txt").write_text("mine")
    # --overwrite: nothing is removed before the new pair builds and its data load
    assert cli("train", *common, "--epochs", 1, "--overwrite", "--model", "nonsense.module:Thing") == 2
    assert (run / "checkpoint.pt").read_bytes() == before
    (run / "eval.json").write_text("{}")
    assert cli("train", *common, "--epochs", 1, "--overwrite", "--z-dim", 3) == 0
    assert json.loads((run / "config.json").read_text())["z_dim"] == 3
    assert not (run / "eval.json").exists() and (run / "notes.txt").read_text() == "mine"
    assert not (run / ".lock").exists()


def test_a_second_writer_is_kept_out_and_a_stale_lock_is_taken_over(run, capsys):
    data = run.parent / "x.npy"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname()}))
        with pytest.raises(RunDirError, match=rf"being written by another training \(pid {alive.pid}"):
            train(config(data, epochs=2), run, resume=True, quiet=True)
        with pytest.raises(RunDirError, match="being written"):
            train(config(data), run, overwrite=True, quiet=True)
    finally:
        alive.kill()
        alive.wait()
    assert load_checkpoint(run)["epoch"] == 1
    capsys.readouterr()
    train(config(data, epochs=2), run, resume=True, quiet=True)  # its pid no longer runs: a stale lock
    assert f"taking over {run / '.lock'} of pid {alive.pid}" in capsys.readouterr().err
    assert load_checkpoint(run)["epoch"] == 2 and not (run / ".lock").exists()
    (run / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(RunDirError, match="cannot check: if no training writes this run, remove"):
        train(config(data, epochs=3), run, resume=True, quiet=True)


# ----------------------------------------------------------------------------------------------
# interrupts and divergence tell the truth


class Interrupt:
    """Raises KeyboardInterrupt at the n-th training step (a stand-in for Ctrl-C)."""

    def __init__(self, monkeypatch, n: int):
        import pyro_vae.training as training

        self.steps, real = 0, training.train_epoch

        def epoch(objective, *args, **kwargs):
            def step(*a, **k):
                self.steps += 1
                if self.steps == n:
                    raise KeyboardInterrupt
                return objective(*a, **k)

            step.train, step.parameters = objective.train, objective.parameters
            return real(step, *args, **kwargs)

        monkeypatch.setattr(training, "train_epoch", epoch)


def test_ctrl_c_in_the_first_epoch_says_nothing_was_saved_and_leaves_nothing(tmp_path, monkeypatch):
    data = points(tmp_path / "x.npy")
    Interrupt(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted, match="nothing was saved.*no run to resume") as e:
        train(config(data, epochs=3), tmp_path / "run", quiet=True)
    assert "removed" in str(e.value) and not (tmp_path / "run").exists()
    monkeypatch.undo()
    Interrupt(monkeypatch, 12)  # 8 steps per epoch: in epoch 2
    with pytest.raises(TrainingInterrupted, match=r"epoch 1 is saved in .*--resume"):
        train(config(data, epochs=3), tmp_path / "run", quiet=True)
    assert load_checkpoint(tmp_path / "run")["epoch"] == 1 and not (tmp_path / "run" / ".lock").exists()


def test_cli_ctrl_c_message(tmp_path, monkeypatch, capsys):
    data = points(tmp_path / "x.npy")
    Interrupt(monkeypatch, 2)
    assert cli("train", "--dataset", data, "--likelihood", "gaussian", "--out", tmp_path / "run", "--quiet",
               "--device", "cpu") == 130
    err = capsys.readouterr().err
    assert "nothing was saved" in err and "last finished epoch" not in err and "--resume" not in err


def test_divergence_names_the_step_and_checkpoint_and_its_advice_works(tmp_path):
    data = points(tmp_path / "x.npy")
    run = tmp_path / "run"
    train(config(data, epochs=1, lr=1e-3), run, quiet=True)
    with pytest.raises(TrainingDiverged) as e:  # lr 1e6: the Gaussian scale collapses at once
        train(config(data, epochs=3, lr=1e6), run, resume=True, quiet=True)
    message = str(e.value)
    assert "epoch 2, step" in message and "last good checkpoint (epoch 1)" in message, message
    assert f"--resume {run} --epochs 3 --lr" in message
    assert load_checkpoint(run)["epoch"] == 1
    step = int(message.split("step ")[1].split(".")[0])
    assert step < 8  # the first non-finite step, not the epoch's last (8 steps)
    # the advice: resume at a lower learning rate, and finish
    assert cli("train", "--resume", run, "--epochs", 3, "--lr", 1e-3, "--quiet") == 0
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["train_loss"]) for r in rows)
    assert json.loads((run / "config.json").read_text())["lr"] == 1e-3


def test_divergence_in_the_first_epoch_says_no_checkpoint(tmp_path):
    data = points(tmp_path / "x.npy")
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step \d+\. No checkpoint was saved") as e:
        train(config(data, epochs=2, lr=1e6), tmp_path / "run", quiet=True)
    assert "epoch 0" not in str(e.value) and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# resume honours or refuses flags


@pytest.mark.parametrize("flag", [["--z-dim", 5], ["--hidden", 8], ["--estimator", "iwae"], ["--seed", 3],
                                  ["--batch-size", 10], ["--particles", 4], ["--likelihood", "laplace"],
                                  ["--model", "linear"], ["--train-size", 10], ["--standardize"],
                                  ["--model-option", "a=1"]])
def test_resume_refuses_flags_that_define_the_run(run, flag, capsys):
    assert cli("train", "--resume", run, "--epochs", 2, *flag) == 2
    err = capsys.readouterr().err.strip()
    assert f"{flag[0]} cannot change on --resume" in err and "--out" in err and "\n" not in err
    assert load_checkpoint(run)["epoch"] == 1


def test_resume_honours_and_records_the_settings_it_may_change(run, capsys):
    assert cli("train", "--resume", run, "--epochs", 3, "--lr", 5e-4, "--lr-decay", 0.5, "--clip-grad", 5,
               "--z-dim", 2, "--quiet") == 0  # --z-dim as the run has it: no change, no refusal
    config = json.loads((run / "config.json").read_text())
    assert (config["epochs"], config["lr"], config["lr_decay"], config["clip_grad"]) == (3, 5e-4, 0.5, 5.0)
    rows = read_metrics(run)
    assert [r["lr"] for r in rows] == [1e-3, 2.5e-4, 1.25e-4]
    assert [r["clip_grad"] for r in rows] == [None, 5.0, 5.0] and "grad_norm" in rows[2]
    assert cli("train", "--resume", run, "--overwrite") == 2
    assert cli("train", "--resume", run, "--out", run.parent / "other") == 2


def test_demo_and_compare_do_not_replace_runs_unasked(run, capsys):
    assert cli("demo", "--out", run) == 2
    assert "already holds a run: replace it with --overwrite" in capsys.readouterr().err
    data = run.parent / "x.npy"
    (run.parent / "cmp" / "runs" / "elbo").mkdir(parents=True)
    (run.parent / "cmp" / "runs" / "elbo" / "config.json").write_text((run / "config.json").read_text())
    assert cli("compare", "--estimators", "elbo", "--dataset", data, "--likelihood", "gaussian", "--z-dim", 2,
               "--out", run.parent / "cmp", "--device", "cpu", "--quiet") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert load_checkpoint(run)["epoch"] == 1
