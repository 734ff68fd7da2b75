"""Do class-conditioned samples of the cvae look like their class? Train a small conv classifier on
MNIST labels, train the label-conditional ``cvae`` (guide ``conditional``) on binarized MNIST,
draw n samples x ~ p(x|y=c) per class (decoder means, as ``pyro-vae sample --label c`` does) and
print the fraction the classifier labels c, per class and overall. The goal is at least 90%.

    python examples/cvae_fidelity.py [--epochs 5] [--n 100]
"""

import argparse
from pathlib import Path

import torch

from pyro_vae.classifier import class_fidelity, train_classifier
from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.plots import save_image_grid
from pyro_vae.run import load_run
from pyro_vae.training import accuracy, resolve_device, train

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--epochs", type=int, default=8, help="cvae training epochs")
p.add_argument("--classifier-epochs", type=int, default=2)
p.add_argument("--train-size", type=int)
p.add_argument("--n", type=int, default=100, help="samples per class")
p.add_argument("--z-dim", type=int, default=50)
p.add_argument("--hidden", type=int, nargs="+", default=[500, 500])
p.add_argument("--device", default="auto")
p.add_argument("--out", default="runs/example-cvae-fidelity")
args = p.parse_args()

device = resolve_device(args.device)
grey = load_dataset("mnist", device, train_size=args.train_size)
classifier = train_classifier(grey, epochs=args.classifier_epochs)
print(f"classifier: test accuracy {accuracy(classifier, grey.test, grey.test_labels):.4f} "
      f"({len(grey.train)} images, {args.classifier_epochs} epochs)")

config = TrainConfig.from_dict(dict(dataset="binarized-mnist", model="cvae", guide="conditional", z_dim=args.z_dim,
                                    hidden=args.hidden, epochs=args.epochs, train_size=args.train_size, seed=0,
                                    device=str(device)))
rows = train(config, args.out, quiet=True, overwrite=True)
_, model, _ = load_run(args.out, device)
torch.manual_seed(0)
frac = class_fidelity(model, classifier, grey.num_classes, args.n)
print(f"cvae: test loss {rows[-1]['test_loss']:.2f} after {args.epochs} epochs; "
      f"fraction of {args.n} samples per class labelled with the requested class:")
print("  ".join(f"{c}: {float(f):.2f}" for c, f in enumerate(frac)))
print(f"overall {float(frac.mean()):.3f} (goal >= 0.90; chance 0.10)")
torch.manual_seed(0)
grid = torch.stack([model.sample(10, y=c) for c in range(grey.num_classes)], 1).reshape(-1, grey.x_dim)
print(save_image_grid(grid, Path(args.out) / "figures" / "samples-by-class.png", grey.image_shape, nrow=10,
                      title="one class per column"))
