"""benchmarks/iwae_table.py: an interrupted or extended table resumes each model, and cached rows
are reused only for the same setting."""

import importlib.util
from pathlib import Path

from pyro_vae.run import read_metrics

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "iwae_table.py"


def _load():
    spec = importlib.util.spec_from_file_location("iwae_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_resumes_extends_and_reuses_rows(tmp_path, capsys):
    table = _load()
    args = ["--train-size", "200", "--test-size", "40", "--eval-k", "5", "--ks", "1", "5",
            "--layers", "1", "--batch-size", "50", "--out", str(tmp_path)]
    assert table.main(["--epochs", "1", *args]) == 0
    first = read_metrics(tmp_path / "1-iwae-5")
    assert [m["epoch"] for m in first] == [1]

    assert table.main(["--epochs", "2", *args]) == 0  # a longer budget continues the same runs
    second = read_metrics(tmp_path / "1-iwae-5")
    assert [m["epoch"] for m in second] == [1, 2] and second[0] == first[0]

    row = tmp_path / "1-iwae-5" / "table_row.json"
    stamp = row.stat().st_mtime_ns
    assert table.main(["--epochs", "2", *args]) == 0  # same setting: nothing retrained
    assert row.stat().st_mtime_ns == stamp
    out = capsys.readouterr().out
    assert "IWAE beats VAE by" in out and "active units" in out
