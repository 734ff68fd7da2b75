"""Anomaly detection on MNIST with held-out digits: for each digit d, train the iwae1 VAE on the
other nine (``--classes``), score every test image by -log p(x) (importance sampling, k
particles), and report the AUROC of the held-out digit's test images against the rest. This is
the likelihood score of VAE anomaly detection (An & Cho 2015 use the related reconstruction
probability); it is known to fail where the anomaly is
*simpler* than the training data (Nalisnick et al. 2019: density models give simple images high
likelihood), and MNIST shows it: the held-out 1s score as more likely than the digits trained on.

    python examples/anomaly.py [--digits 0 1 9] [--epochs 5] [--k 100]

The same from the command line, for one digit:

    pyro-vae train --preset iwae1 --classes 0 1 2 3 4 5 6 7 8 --epochs 5 --out runs/no9
    pyro-vae anomaly runs/no9 --k 100          # AUROC of the 9s; runs/no9/figures/anomalies.png
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from pyro_vae.applications import anomaly_scores, auroc
from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.run import load_run
from pyro_vae.training import resolve_device, train

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--digits", type=int, nargs="+", default=[0, 1, 7, 9], help="the held-out digits, one run each")
p.add_argument("--epochs", type=int, default=5)
p.add_argument("--k", type=int, default=100, help="importance samples per test image")
p.add_argument("--test-size", type=int, default=None, help="score the first N test images (default all 10,000)")
p.add_argument("--device", default="auto")
p.add_argument("--out", default="runs/example-anomaly")
args = p.parse_args()

device = resolve_device(args.device)
test = load_dataset("binarized-mnist", device, train_size=1, test_size=args.test_size)
print(f"{'held out':>8} {'AUROC':>7} {'median -log p(x): held out':>27} {'others':>7}")
for digit in args.digits:
    run = Path(args.out) / f"without-{digit}"
    config = TrainConfig.from_dict(dict(preset="iwae1", dataset="binarized-mnist", epochs=args.epochs,
                                        classes=[c for c in range(10) if c != digit], device=str(device), seed=0))
    train(config, run, quiet=True, overwrite=True)
    _, model, guide = load_run(run, device)
    torch.manual_seed(0)
    scores = anomaly_scores(model, guide, test.test, k=args.k)
    held_out = (test.test_labels == digit).cpu().numpy()
    print(f"{digit:>8} {auroc(scores[~held_out], scores[held_out]):7.3f} {np.median(scores[held_out]):27.1f} "
          f"{np.median(scores[~held_out]):7.1f}", flush=True)
