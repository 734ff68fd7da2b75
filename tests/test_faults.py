"""Fault injection: bad flags, config files and data, damaged run files, a full disk, a folder
that cannot be written, a bug. Each must end in one clear line that names the problem (or, for
a bug, its traceback and whose it is), with nothing lost and nothing half-written."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae.cli import _without_flag, main
from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.errors import CheckpointError, ConfigError, DataError, RunDirError, UserError
from pyro_vae.evaluation import evaluate
from pyro_vae.files import atomic_write
from pyro_vae.guides.gaussian import GaussianGuide
from pyro_vae.models.vae import VAE
from pyro_vae.objectives import Objective, make_estimator
from pyro_vae.run import code_paths, load_checkpoint, load_config, read_metrics
from pyro_vae.training import train

ROOT = Path(__file__).resolve().parent.parent


def points(path: Path, n: int = 300) -> Path:
    g = torch.Generator().manual_seed(0)
    np.save(path, torch.randn(n, 2, generator=g).numpy().astype(np.float32))
    return path


def small(data: Path, **kw) -> TrainConfig:
    base = dict(dataset=str(data), likelihood="gaussian", z_dim=2, hidden=[8], epochs=1, batch_size=50,
                device="cpu", estimator="elbo")
    return TrainConfig(**{**base, **kw})


def one_line_error(capsys, code: int, *needles: str) -> str:
    """The command failed with exit 2 and one stderr line holding each needle; no traceback."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def run_cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as e:  # argparse's errors
        return e.code


# ----------------------------------------------------------------------------------------------
# every setting, checked once from its declaration: the flag, the TOML key, TrainConfig(...)

BAD_FLAGS = [
    (["--epochs", "0"], "--epochs"), (["--epochs", "-1"], "--epochs"), (["--epochs", "x"], "--epochs"),
    (["--clip-grad", "-1"], "--clip-grad"), (["--hidden", "0"], "--hidden"), (["--validation", "-1"], "--validation"),
    (["--train-size", "0"], "--train-size"), (["--z-dim", "0"], "--z-dim"), (["--particles", "0"], "--particles"),
    (["--batch-size", "0"], "--batch-size"), (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"),
    (["--beta", "nan"], "--beta"), (["--beta", "-1"], "--beta"), (["--cycle-ratio", "2"], "--cycle-ratio"),
    (["--lr-decay", "0"], "--lr-decay"), (["--labels", "-3"], "--labels"), (["--image-shape", "1", "2"], "--image-shape"),
    (["--net", "cnn"], "--net"), (["--activation", "relux"], "did you mean 'relu'"), (["--amp", "fp8"], "--amp"),
    (["--preset", "huge"], "--preset"), (["--model", "vea"], "did you mean 'vae'"), (["--seed", "-2"], "--seed"),
    (["--estimator", "iwea:K=5"], "did you mean 'iwae'"), (["--estimator", "iwae:K=0"], "K must be a positive"),
    (["--device", "gpu7"], "device = 'gpu7'"), (["--gamma", "0"], "--gamma"), (["--free-bits", "-0.5"], "--free-bits"),
    (["--warmup-epochs", "2", "--cycle-epochs", "3"], "choose one"),
    (["--labelled-every", "2"], "--labels"),
]


@pytest.mark.parametrize("flags,needle", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_line_naming_it(flags, needle, tmp_path, capsys):
    code = run_cli("train", *flags, "--out", tmp_path / "r")
    one_line_error(capsys, code, needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--model", "ssvae", "--guide", "ssvae", "--estimator", "enum"], "ssvae needs labelled data"),
    (["--model", "cvae", "--guide", "conditional"], "cvae needs the context width"),
])
def test_a_conditional_model_on_unlabelled_data_is_one_line(flags, needle, tmp_path, capsys):
    code = run_cli("train", *flags, "--dataset", points(tmp_path / "x.npy"), "--out", tmp_path / "r")
    one_line_error(capsys, code, needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("toml,needle", [
    ('jit = "no"', "jit = 'no': must be true or false"), ('epochs = "5"', "epochs = '5': must be an integer"),
    ("hidden = 400", "hidden = 400: must be a list"), ("lr = true", "lr = True: must be a finite number"),
    ("epoch = 3", "did you mean 'epochs'?"), ('x_dim = "a"', "x_dim = 'a'"), ("epochs = [", "is not valid TOML"),
    ("model_options = 3", "model_options = 3: must be a table"),
])
def test_a_bad_config_file_names_the_file_and_key(toml, needle, tmp_path, capsys):
    (tmp_path / "c.toml").write_text(toml + "\n")
    code = run_cli("train", "--config", tmp_path / "c.toml", "--out", tmp_path / "r")
    one_line_error(capsys, code, needle, "c.toml")
    code = run_cli("train", "--config", tmp_path / "c.toml", "--epochs", "1", "--out", tmp_path / "r")
    one_line_error(capsys, code, needle, "c.toml")  # checked even where a flag overrides the key
    code = run_cli("train", "--config", tmp_path / "missing.toml", "--out", tmp_path / "r")
    one_line_error(capsys, code, "cannot read --config", "missing.toml")


def test_trainconfig_checks_what_python_gives():
    for bad in (dict(epochs=0), dict(beta=-1.0), dict(beta=math.nan), dict(lr=math.inf), dict(jit="no"),
                dict(particles=0), dict(hidden=[0]), dict(clip_grad=-1.0), dict(batch_size=True)):
        with pytest.raises(ConfigError, match=f"{next(iter(bad))} = "):
            TrainConfig(**bad)
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)  # ints widen


def test_run_command_flags_out_of_range(tmp_path, capsys):
    for args, needle in ((["eval", tmp_path, "--k", "0"], "--k"), (["sample", tmp_path, "--n", "0"], "--n"),
                         (["interpolate", tmp_path, "--steps", "1"], "--steps"),
                         (["traverse", tmp_path, "--span", "-1"], "--span"),
                         (["impute", tmp_path, "--fraction", "2"], "--fraction"),
                         (["anomaly", tmp_path, "--test-size", "0"], "--test-size")):
        one_line_error(capsys, run_cli(*args), needle)


def test_nproc_with_equals_sign_is_taken_out_of_the_workers_command():
    argv = ["train", "--nproc=2", "--epochs", "3", "--max-restarts", "1", "--out", "r"]
    assert _without_flag(_without_flag(argv, "--nproc"), "--max-restarts") == ["train", "--epochs", "3", "--out", "r"]


# ----------------------------------------------------------------------------------------------
# data files

def _save(path: Path, obj) -> str:
    if path.suffix == ".npy":
        np.save(path, obj, allow_pickle=True)
    else:
        torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("name,obj,needle", [
    ("empty.npy", np.zeros((0, 3), np.float32), "0 rows"),
    ("one.npy", np.zeros((1, 3), np.float32), "1 rows"),
    ("complex.npy", np.ones((10, 3), np.complex64), "complex numbers"),
    ("strings.npy", np.array([["a", "b"]] * 10), "strings"),
    ("objects.npy", np.array([[{}, 1]] * 10, dtype=object), "cannot read"),
    ("vector.npy", np.zeros(10, np.float32), "need (N, features...)"),
    ("nan.npy", np.full((10, 3), np.nan, np.float32), "NaN or infinite"),
    ("nox.pt", {"data": torch.zeros(10, 3)}, 'under "x"'),
    ("labels.pt", {"x": torch.zeros(10, 3), "y": torch.zeros(9, dtype=torch.long)}, "one per row, (10,)"),
    ("complex.pt", torch.ones(10, 3, dtype=torch.complex64), "complex numbers"),
    ("notensor.pt", {"x": "text"}, "is a str"),
])
def test_bad_data_files_are_refused_by_name(tmp_path, name, obj, needle):
    path = _save(tmp_path / name, obj)
    with pytest.raises(DataError) as e:
        load_dataset(path)
    assert needle in str(e.value), str(e.value)


def test_corrupt_files_and_image_folders(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    (tmp_path / "junk.pt").write_bytes(b"not torch either")
    for name in ("junk.npy", "junk.pt"):
        with pytest.raises(DataError, match=f"cannot read .*{name}"):
            load_dataset(str(tmp_path / name))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="one sub-folder of images per class"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "images" / "a").mkdir(parents=True)
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "images" / "a" / "good.png")
    (tmp_path / "images" / "a" / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="cannot read image .*bad.png"):
        load_dataset(str(tmp_path / "images"))


def test_selection_that_leaves_no_rows(tmp_path):
    data = _save(tmp_path / "y.pt", {"x": torch.zeros(20, 2), "y": torch.tensor([0] * 19 + [1])})
    with pytest.raises(DataError, match="no (training|test) data of .* is left after --classes"):
        load_dataset(data, classes=[1])


# ----------------------------------------------------------------------------------------------
# the Python API checks what it is given, as the CLI does

def test_objective_and_evaluate_refuse_bad_data_and_weights():
    objective = Objective(VAE(), GaussianGuide(), make_estimator("elbo"))
    x = torch.rand(4, 784).bernoulli()
    assert torch.isfinite(objective(x))
    with pytest.raises(DataError, match="NaN"):
        objective(x.masked_fill(x > 0, math.nan))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        objective(x * 255)
    with pytest.raises(ConfigError, match="beta = -1"):
        objective(x, beta=-1)
    with pytest.raises(DataError, match="NaN"):
        evaluate(VAE(), GaussianGuide(), x.masked_fill(x > 0, math.nan), k=2, psis=False)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        evaluate(VAE(), GaussianGuide(), x * 255, k=2, psis=False)
    with pytest.raises(ConfigError, match="k = 0"):
        evaluate(VAE(), GaussianGuide(), x, k=0)


# ----------------------------------------------------------------------------------------------
# run directories: damaged files, resume from Python, a full disk, an unwritable folder

@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    train(small(points(tmp_path / "x.npy")), run, quiet=True)
    return run


def test_damaged_run_files_are_one_line(run, capsys):
    config = (run / "config.json").read_text()
    for text, needle in (("[1, 2]", "JSON list"), ("{", "damaged"), ('{"epochs": 0}', "epochs = 0"),
                         ('{"nonsense": 1}', "unknown config keys")):
        (run / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=needle):
            load_config(run)
        one_line_error(capsys, run_cli("eval", run, "--k", "2"), "config.json")
    (run / "config.json").write_text(config)
    (run / "metrics.jsonl").write_text('{"epoch": 1}\nnot json\n')
    with pytest.raises(CheckpointError, match="metrics.jsonl is damaged"):
        read_metrics(run)


def test_a_malicious_checkpoint_never_runs(run, tmp_path, capsys):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (run / "checkpoint.pt").write_bytes(pickle.dumps({"model": Evil()}))
    one_line_error(capsys, run_cli("eval", run, "--k", "2"), "cannot read checkpoint")
    assert not marker.exists()


def test_a_builtin_function_named_as_a_model_is_refused_even_when_trusted(run, capsys):
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": "os:system"}))
    one_line_error(capsys, run_cli("eval", run, "--k", "2", "--trust-code"), "'os:system' is a", "not a Pyro program")


def test_a_file_in_the_way_of_an_output_folder(run, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    one_line_error(capsys, run_cli("sample", run, "--out", tmp_path / "afile" / "x.png"), "File exists", "afile")
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_likelihood_by_import_path_needs_trust(run):
    config = json.loads((run / "config.json").read_text())
    config["likelihood"] = "evil_module:Likelihood"
    (run / "config.json").write_text(json.dumps(config))
    assert ("likelihood", "evil_module:Likelihood") in code_paths(load_config(run))


def test_resume_from_python_refuses_a_changed_model(run, tmp_path):
    with pytest.raises(ConfigError, match="--z-dim cannot change on --resume"):
        train(small(tmp_path / "x.npy", z_dim=3, epochs=2), run, resume=True, quiet=True)
    saved = (run / "config.json").read_text()
    with pytest.raises(ConfigError, match="has trained 1 epochs, and --epochs 1 is the total to reach"):
        train(small(tmp_path / "x.npy", epochs=1), run, resume=True, quiet=True)  # nothing to do is said
    assert (run / "config.json").read_text() == saved and not (run / ".lock").exists()
    train(small(tmp_path / "x.npy", epochs=2, lr=1e-4), run, resume=True, quiet=True)
    assert [m["lr"] for m in read_metrics(run)] == [1e-3, 1e-4]


def test_a_failed_write_leaves_no_temporary_file_and_the_old_file_intact(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")

    def full_disk(p):
        Path(p).write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(p))

    with pytest.raises(OSError, match="No space left on device"):
        atomic_write(target, full_disk)
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f.json"]

    def write_fails(p):  # a failed write() names no file: atomic_write names the target
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as e:
        atomic_write(target, write_fails)
    assert e.value.filename == str(target)


def test_a_full_disk_during_training_keeps_the_last_checkpoint_resumable(run, tmp_path, monkeypatch, capsys):
    before = load_checkpoint(run)
    real = Path.write_bytes

    def full(self, data):
        if self.name.startswith(".checkpoint.pt"):
            real(self, bytes(data)[:10])  # a part written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    code = run_cli("train", "--resume", run, "--epochs", 2, "--quiet")
    err = one_line_error(capsys, code, "cannot save epoch 2: No space left on device",
                         "the checkpoint of epoch 1 is intact", f"--resume {run} --epochs 2")
    assert "tmp" not in " ".join(os.listdir(run)), os.listdir(run)
    assert load_checkpoint(run)["epoch"] == 1 and not (run / ".lock").exists(), err
    assert json.loads((run / "config.json").read_text())["epochs"] == 1  # config.json goes with the checkpoint
    monkeypatch.setattr(Path, "write_bytes", real)
    assert run_cli("train", "--resume", run, "--epochs", 2, "--quiet") == 0
    after = load_checkpoint(run)
    assert after["epoch"] == 2 and before["epoch"] == 1


def test_an_unwritable_folder_is_one_line(tmp_path, monkeypatch, capsys):
    data = points(tmp_path / "x.npy")
    real = Path.mkdir

    def refuse(self, *a, **k):
        if "blocked" in str(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse)
    code = run_cli("train", "--dataset", data, "--likelihood", "gaussian", "--z-dim", 2, "--hidden", 8,
                   "--epochs", 1, "--device", "cpu", "--quiet", "--out", tmp_path / "blocked" / "run")
    one_line_error(capsys, code, "Permission denied", "blocked")


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a small tmpfs needs root on Linux")
def test_a_real_full_disk(tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        data = tmp_path / "x.npy"
        np.save(data, np.random.default_rng(0).normal(size=(300, 64)).astype(np.float32))
        code = run_cli("train", "--dataset", data, "--likelihood", "gaussian", "--z-dim", 2, "--hidden", 400,
                       "--epochs", 1, "--device", "cpu", "--quiet", "--out", disk / "run")
        one_line_error(capsys, code, "No space left on device")
        leftovers = [p.name for p in disk.rglob("*") if "tmp" in p.name]
        assert not leftovers
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ----------------------------------------------------------------------------------------------
# a bug keeps its traceback, with a line saying whose it is

def test_a_bug_keeps_its_traceback(tmp_path):
    bug = tmp_path / "buggy.py"
    bug.write_text("from pyro_vae.models.vae import VAE\nclass Model(VAE):\n"
                   "    def forward(self, x):\n        raise KeyError('oops')\n")
    p = subprocess.run([sys.executable, "-m", "pyro_vae", "train", "--model", "buggy:Model",
                        "--dataset", str(points(tmp_path / "x.npy")), "--likelihood", "gaussian", "--z-dim", "2",
                        "--out", str(tmp_path / "r"), "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert p.returncode == 1 and "Traceback" in p.stderr and "KeyError: 'oops'" in p.stderr
    assert "arose in your program" in p.stderr and "buggy.py" in p.stderr


def test_every_user_error_class_is_a_usererror():
    import pyro_vae.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) >= 10 and all(issubclass(c, UserError) for c in classes)
    assert issubclass(RunDirError, ValueError) and issubclass(DataError, ValueError)
