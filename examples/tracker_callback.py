"""Log a training run to an experiment tracker through a callback.

pyro-vae depends on no tracker; a callback is a few lines. This one sends every epoch's metrics
to MLflow when it is installed (``pip install mlflow``), and otherwise appends them to a CSV
file, the format every tracker imports.

    python examples/tracker_callback.py --epochs 3 --out runs/tracked
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pyro_vae


class TrackerLogger(pyro_vae.Callback):
    """Every numeric metric of every epoch, to MLflow or to ``RUN/tracker.csv``."""

    def __init__(self, experiment: str = "pyro-vae"):
        try:
            import mlflow
        except ImportError:
            mlflow = None
        self.mlflow, self.experiment, self.csv = mlflow, experiment, None

    def on_train_start(self, state):
        if not state.is_main:  # one process logs in a distributed run
            return
        if self.mlflow:
            self.mlflow.set_experiment(self.experiment)
            self.mlflow.start_run()
            self.mlflow.log_params({k: v for k, v in state.config.to_dict().items() if isinstance(v, (int, float, str))})
        else:
            self.csv = Path(state.run_dir) / "tracker.csv"

    def on_epoch_end(self, state, row):
        if not state.is_main:
            return
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.mlflow:
            self.mlflow.log_metrics(numbers, step=state.epoch)
            return
        new = not self.csv.exists()
        with self.csv.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted(numbers))
            if new:
                writer.writeheader()
            writer.writerow(numbers)

    def on_train_end(self, state):
        if state.is_main and self.mlflow:
            self.mlflow.end_run()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=10_000)
    p.add_argument("--out", default="runs/tracked")
    args = p.parse_args()
    config = pyro_vae.TrainConfig(preset="iwae1", epochs=args.epochs, train_size=args.train_size)
    logger = TrackerLogger()
    pyro_vae.train(config, args.out, overwrite=Path(args.out, "config.json").exists(), callbacks=[logger])
    print(f"logged to {'MLflow' if logger.mlflow else logger.csv}")


if __name__ == "__main__":
    main()
