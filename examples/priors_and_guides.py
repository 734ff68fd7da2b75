"""Standard prior + diagonal guide vs VampPrior vs mixture prior vs IAF vs low-rank guide, at
equal budget on binarized MNIST with the iwae1 nets; test log-likelihood with k importance samples.

    python examples/priors_and_guides.py                  # defaults: 10,000 images, 4 epochs, k=200 on 500
    python examples/priors_and_guides.py --epochs 10 --train-size 60000 --k 1000 --test-size 2000
"""

import argparse
import tempfile
from pathlib import Path

import torch

from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.evaluation import evaluate
from pyro_vae.run import load_run
from pyro_vae.training import train

VARIANTS = {
    "vae + gaussian": {},
    "vamp (K=500) + gaussian": {"model": "vamp"},
    "mog (K=10) + gaussian": {"model": "mog"},
    "vae + iaf (2 flows)": {"guide": "iaf"},
    "vae + lowrank (rank 2)": {"guide": "lowrank"},
}

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--train-size", type=int, default=10000)
p.add_argument("--epochs", type=int, default=4)
p.add_argument("--k", type=int, default=200)
p.add_argument("--test-size", type=int, default=500)
args = p.parse_args()

data = load_dataset("binarized-mnist", "cpu", train_size=args.train_size, test_size=args.test_size)
out = Path(tempfile.mkdtemp(prefix="priors-guides-"))
print(f"{'variant':<26} {'test ELBO':>10} {'log p(x)':>10}")
for i, (name, options) in enumerate(VARIANTS.items()):
    config = TrainConfig.from_dict({"preset": "iwae1", "epochs": args.epochs, "device": "cpu", **options})
    train(config, out / str(i), quiet=True, dataset=data)
    _, model, guide = load_run(out / str(i))
    torch.manual_seed(0)
    r = evaluate(model, guide, data.test, k=args.k, max_batch_particles=5_000)  # vamp: particles x 500 components
    print(f"{name:<26} {r['test_elbo']:10.2f} {r['test_log_likelihood']:10.2f}", flush=True)
