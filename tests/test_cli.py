import json
import subprocess
import sys

import pytest


def pyro_vae(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "pyro_vae", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"pyro-vae {args} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc


@pytest.mark.parametrize("command", ["train", "eval", "sample", "reconstruct", "interpolate", "traverse",
                                     "impute", "anomaly", "represent", "compare", "demo"])
def test_every_subcommand_explains_itself(command):
    out = pyro_vae(command, "--help").stdout
    assert "usage: pyro-vae " + command in out and len(out) > 200


def test_train_eval_sample_reconstruct_resume(tmp_path):
    run = tmp_path / "run"
    pyro_vae("train", "--preset", "iwae1", "--epochs", 1, "--train-size", 500, "--test-size", 200,
             "--out", run, "--quiet")
    r = pyro_vae("eval", run, "--k", 20, "--test-size", 100, "--quiet")
    result = json.loads((run / "eval.json").read_text())
    assert "test_log_likelihood" in r.stdout
    assert result["k"] == 20 and result["num_points"] == 100
    assert result["test_elbo"] <= result["test_log_likelihood"] < 0
    pyro_vae("sample", run)
    pyro_vae("reconstruct", run)
    assert (run / "figures" / "samples.png").stat().st_size > 1000
    assert (run / "figures" / "reconstructions.png").stat().st_size > 1000
    pyro_vae("train", "--resume", run, "--epochs", 2, "--quiet")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_config_file_and_flags(tmp_path):
    (tmp_path / "run.toml").write_text('preset = "seed"\nepochs = 1\ntrain_size = 300\ntest_size = 100\nz_dim = 7\n')
    pyro_vae("train", "--config", tmp_path / "run.toml", "--z-dim", 5, "--out", tmp_path / "run", "--quiet")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["z_dim"] == 5 and config["hidden"] == [400] and config["epochs"] == 1  # flags win


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    p = pyro_vae("train", "--model", "nonsense", "--out", tmp_path / "r", check=False)
    assert p.returncode == 2 and "argument --model: 'nonsense': must be one of " in p.stderr and "vae" in p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("\n") == 1
    p = pyro_vae("eval", tmp_path / "missing", check=False)
    assert p.returncode == 2 and "not a run directory" in p.stderr
    p = pyro_vae("train", "--estimator", "iwea:K=5", "--out", tmp_path / "r", check=False)
    assert p.returncode == 2 and "unknown estimator 'iwea'" in p.stderr
