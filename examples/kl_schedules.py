"""KL schedules side by side on binarized MNIST: beta = 1, beta = 4, cyclical annealing,
capacity annealing and free bits; prints the test ELBO and the KL (total and active units).

    python examples/kl_schedules.py [--train-size 10000] [--epochs 5]
"""

import argparse
import tempfile
from pathlib import Path

from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.objectives import kl_per_dimension
from pyro_vae.run import load_run
from pyro_vae.training import train

SCHEDULES = {
    "beta=1": {},
    "beta=4 (Higgins)": {"beta": 4.0},
    "cyclical (Fu)": {"cycle_epochs": 2, "cycle_ratio": 0.5},
    "capacity C->10 (Burgess)": {"capacity": 10.0, "capacity_epochs": 3, "gamma": 30.0},
    "free bits 0.25 (Kingma)": {"free_bits": 0.25, "estimator": "meanfield"},
}

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--train-size", type=int, default=10000)
p.add_argument("--epochs", type=int, default=5)
args = p.parse_args()

data = load_dataset("binarized-mnist", "cpu", train_size=args.train_size, test_size=1000)
out = Path(tempfile.mkdtemp(prefix="kl-schedules-"))
print(f"{'schedule':<26} {'test -ELBO':>10} {'KL':>6} {'dims KL>0.1':>11}")
for i, (name, options) in enumerate(SCHEDULES.items()):
    config = TrainConfig.from_dict({"preset": "seed", "epochs": args.epochs, "device": "cpu", **options})
    rows = train(config, out / str(i), quiet=True, dataset=data)
    _, model, guide = load_run(out / str(i))
    kl = kl_per_dimension(model, guide, data.test)
    print(f"{name:<26} {rows[-1]['test_loss']:10.2f} {float(kl.sum()):6.2f} {int((kl > 0.1).sum()):11d}")
