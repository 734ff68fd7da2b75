"""Representation learning on MNIST: the codes E_q[z|x] of a VAE trained without labels, read
out by a linear probe (multinomial logistic regression) fitted on N labelled training images,
beside the same probe on the raw pixels; test accuracy on all 10,000 test images. This is the
M1 idea of Kingma et al. 2014 (a VAE's latent space as features for a classifier trained on few
labels), measured with the plainest classifier so that the features, not the classifier, differ.

    python examples/representations.py [--epochs 10] [--labels 100 600 1000 3000 10000]

From the command line, on any run: ``pyro-vae represent RUN --labels 100 1000``.
"""

import argparse
from pathlib import Path

from pyro_vae.applications import represent_run
from pyro_vae.config import TrainConfig
from pyro_vae.training import train

# Kingma et al. 2014, Table 1: test error (%) of M1 features + a transductive SVM
M1_TSVM_ERROR = {100: 11.82, 600: 5.72, 1000: 4.24, 3000: 3.49}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--epochs", type=int, default=10)
p.add_argument("--labels", type=int, nargs="+", default=[100, 600, 1000, 3000, 10000])
p.add_argument("--z-dim", type=int, default=50)
p.add_argument("--device", default="auto")
p.add_argument("--out", default="runs/example-representations")
args = p.parse_args()

config = TrainConfig.from_dict(dict(preset="iwae1", dataset="binarized-mnist", epochs=args.epochs, z_dim=args.z_dim,
                                    device=args.device, seed=0))
train(config, Path(args.out), quiet=True, overwrite=True)
r = represent_run(args.out, args.labels, device=args.device)
print(f"iwae1 VAE ({r['latent_dims']}-d codes), {args.epochs} epochs without labels; linear probe, test accuracy")
print(f"{'labels':>7} {'VAE codes':>10} {'raw pixels':>11} {'Kingma M1+TSVM':>15}")
for row in r["rows"]:
    ref = M1_TSVM_ERROR.get(row["labels"])
    print(f"{row['labels']:>7} {row['latent_accuracy']:10.4f} {row['raw_accuracy']:11.4f} "
          f"{'' if ref is None else f'{1 - ref / 100:.4f}':>15}", flush=True)
