"""The package as users get it: a wheel built from the repository, installed into a fresh virtual
environment, runs `pyro-vae train` and `eval` from a folder outside the repository."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def sh(*cmd, cwd=None) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_trains_outside_the_repository(tmp_path):
    sh(sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
       "-q")
    wheel = next((tmp_path / "dist").glob("pyro_vae-*.whl"))
    sh(sys.executable, "-m", "venv", tmp_path / "venv")
    fresh = tmp_path / "venv" / "bin"
    # the dependencies (torch, pyro, ...) come from this environment rather than a second download
    fresh_site = next((tmp_path / "venv" / "lib").glob("python3*/site-packages"))
    (fresh_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    sh(fresh / "python", "-m", "pip", "install", "--no-deps", "-q", wheel)

    outside = tmp_path / "work"
    outside.mkdir()
    where = sh(fresh / "python", "-c", "import pyro_vae; print(pyro_vae.__file__)", cwd=outside)
    assert str(tmp_path / "venv") in where and str(ROOT) not in where  # the installed copy, not the repository
    assert sh(fresh / "python", "-c", "import importlib.resources as r; print(r.files('pyro_vae').joinpath("
              "'py.typed').is_file())", cwd=outside).strip() == "True"
    assert sh(fresh / "pyro-vae", "--version", cwd=outside).startswith("pyro-vae 0.")
    np.save(outside / "points.npy", np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32))
    sh(fresh / "pyro-vae", "train", "--dataset", "points.npy", "--likelihood", "gaussian", "--z-dim", "2",
       "--hidden", "16", "--epochs", "2", "--device", "cpu", "--quiet", "--out", "run", cwd=outside)
    out = sh(fresh / "pyro-vae", "eval", "run", "--k", "20", "--quiet", cwd=outside)
    assert "test_log_likelihood" in out and (outside / "run" / "eval.json").exists()
    description = sh(fresh / "python", "-c", "import importlib.metadata as m; print(m.metadata('pyro-vae').get_payload())",
                     cwd=outside)
    assert description.startswith("# pyro-vae") and "pip install pyro-vae" in description
    assert "make demo" not in description  # the repository's targets are not on the package index page
