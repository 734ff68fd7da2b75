"""Missing pixels of binarized MNIST test images filled in by a trained VAE: the sampler of
Mattei & Frellsen 2018 (Metropolis-within-Gibbs, exact for any guide) beside Rezende et al.'s
pseudo-Gibbs (always accept; exact only if the guide were the true posterior) and the per-pixel
training mean, for several missing patterns. Prints the RMSE of E[x_m | x_o] on the missing
pixels, and the chains' acceptance rate.

    python examples/imputation.py [--epochs 10] [--n 1000] [--steps 500]

From the command line, on any run: ``pyro-vae impute RUN --missing bottom-half``.
"""

import argparse
from pathlib import Path

import torch

from pyro_vae.applications import imputation_error, impute, missing_mask
from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.run import load_run
from pyro_vae.training import resolve_device, train

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--epochs", type=int, default=10)
p.add_argument("--n", type=int, default=1000, help="test images")
p.add_argument("--steps", type=int, default=500)
p.add_argument("--burn-in", type=int, default=100)
p.add_argument("--device", default="auto")
p.add_argument("--out", default="runs/example-imputation")
args = p.parse_args()

device = resolve_device(args.device)
run = Path(args.out)
config = TrainConfig.from_dict(dict(preset="iwae1", dataset="binarized-mnist", epochs=args.epochs,
                                    device=str(device), seed=0))
train(config, run, quiet=True, overwrite=True)
_, model, guide = load_run(run, device)
data = load_dataset("binarized-mnist", device, test_size=args.n)
x = data.test
print(f"iwae1 VAE, {args.epochs} epochs; {len(x)} test images; {args.steps} steps ({args.burn_in} burn-in)")
print(f"{'missing':<14} {'training mean':>13} {'pseudo-Gibbs':>12} {'MWG':>7} {'MWG acceptance':>15}")
for pattern, fraction in (("bottom-half", 0.5), ("right-half", 0.5), ("random", 0.5), ("random", 0.8)):
    observed = ~missing_mask(len(x), x.shape[-1], data.image_shape, pattern, fraction).to(device)
    baseline = torch.where(observed, x, data.train.mean(0))
    pg = impute(model, guide, x, observed, args.steps, args.burn_in, method="pseudo-gibbs")
    mwg = impute(model, guide, x, observed, args.steps, args.burn_in, method="mwg")
    name = pattern if pattern != "random" else f"random {fraction:.0%}"
    print(f"{name:<14} {imputation_error(x, baseline, observed):13.4f} {imputation_error(x, pg['mean'], observed):12.4f} "
          f"{imputation_error(x, mwg['mean'], observed):7.4f} {mwg['acceptance']:15.2f}", flush=True)
