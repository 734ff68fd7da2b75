"""torchrun with 2 CPU processes (gloo): DDP equals one process on the same global batches."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae.distributed import World
from pyro_vae.run import load_checkpoint, read_metrics

TESTS = Path(__file__).parent
COMMON = ["--dataset", "mnist", "--train-size", "800", "--test-size", "200", "--batch-size", "100",
          "--preset", "seed", "--guide", "ddp_helpers:DeltaGuide", "--quiet", "--device", "cpu"]


def run(*args, nproc=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pyro_vae", "train", *COMMON, *map(str, args)]
    if nproc:
        cmd += ["--nproc", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def params(run_dir):
    state = load_checkpoint(run_dir)
    return {f"{part}.{k}": v for part in ("model", "guide") for k, v in state[part].items()}


def test_two_processes_equal_one_process_and_resume(tmp_path):
    run("--epochs", 2, "--out", tmp_path / "single")
    run("--epochs", 2, "--out", tmp_path / "ddp", nproc=2)
    run("--epochs", 1, "--out", tmp_path / "resumed", nproc=2)
    run("--resume", tmp_path / "resumed", "--epochs", 2, "--trust-code", nproc=2)  # it names ddp_helpers

    single, ddp, resumed = params(tmp_path / "single"), params(tmp_path / "ddp"), params(tmp_path / "resumed")
    for k in single:
        assert torch.allclose(ddp[k], single[k], atol=1e-5), k  # same global batches, averaged grads
        assert torch.equal(resumed[k], ddp[k]), k  # killed after epoch 1 and resumed = uninterrupted
    a, b = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):  # metrics reduced over ranks equal the one-process figures
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-3 * abs(ra["train_loss"])
        assert abs(ra["test_loss"] - rb["test_loss"]) < 1e-3 * abs(ra["test_loss"])
    rng = load_checkpoint(tmp_path / "ddp")["rng"]  # one RNG state per rank, each its own
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert World(0, 2, 0).device(torch.device("cuda")) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"has no GPU of its own: it has 1.*--nproc 1"):
        World(1, 2, 1).device(torch.device("cuda"))
    assert World(1, 2, 1).device(torch.device("cpu")) == torch.device("cpu")


def _rank_process(out: Path, rank: int) -> int | None:
    """The pid of the first-attempt worker of ``rank`` in the launch writing ``out``."""
    wanted = {f"PYRO_VAE_ELASTIC_OUT={out.resolve()}", f"RANK={rank}", "TORCHELASTIC_RESTART_COUNT=0"}
    for entry in Path("/proc").iterdir():
        try:
            env = set((entry / "environ").read_bytes().decode(errors="replace").split("\0"))
        except (OSError, ValueError):
            continue
        if wanted <= env:
            return int(entry.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="finds the worker through /proc")
def test_a_killed_worker_is_restarted_and_the_run_resumes_from_its_checkpoint(tmp_path):
    """`--nproc 2 --max-restarts 1`: kill -9 rank 1 after the first checkpoint; torchrun restarts
    the group, the workers resume from the last checkpoint, and the finished run equals an
    uninterrupted one bitwise (a resume draws what the uninterrupted run drew)."""
    import signal
    import time

    common = [*COMMON, "--train-size", "5000", "--epochs", "4"]
    out = tmp_path / "elastic"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    log_path = tmp_path / "log"
    launcher = subprocess.Popen([sys.executable, "-m", "pyro_vae", "train", *common, "--out", str(out),
                                 "--nproc", "2", "--max-restarts", "1"], env=env,
                                stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    deadline, killed = time.time() + 300, None
    while time.time() < deadline and launcher.poll() is None and killed is None:
        if read_metrics(out):  # epoch 1 is saved: kill rank 1 in the middle of what follows
            pid = _rank_process(out, 1)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.05)
    launcher.wait(timeout=600)
    log = log_path.read_text()
    assert killed is not None, log[-3000:]
    assert launcher.returncode == 0, log[-3000:]
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2, 3, 4]
    run("--train-size", "5000", "--epochs", "4", "--out", tmp_path / "plain", nproc=2)
    elastic, plain = params(out), params(tmp_path / "plain")
    for k in plain:
        assert torch.equal(elastic[k], plain[k]), k
