"""A convolutional VAE on 8-bit MNIST grey levels with the discretized logistic likelihood,
reporting bits per dimension; then samples to a PNG.

    python examples/conv_vae.py [--train-size 10000] [--epochs 3] [--dataset PATH_TO_IMAGE_FOLDER]
"""

import argparse
from pathlib import Path

from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.evaluation import evaluate
from pyro_vae.plots import save_image_grid
from pyro_vae.run import load_run
from pyro_vae.training import train

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--dataset", default="mnist", help="mnist, or an image folder of 28x28 or 32x32 images")
p.add_argument("--train-size", type=int, default=10000)
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--out", default="runs/example-conv-vae")
args = p.parse_args()

config = TrainConfig.from_dict(dict(dataset=args.dataset, train_size=args.train_size, test_size=1000, net="conv",
                                    likelihood="discretized-logistic", z_dim=16, hidden=[256],
                                    init_output_bias=True, epochs=args.epochs, device="cpu"))
train(config, args.out, overwrite=True)
config, model, guide = load_run(args.out)
data = load_dataset(config.dataset, "cpu", train_size=1, test_size=1000)
r = evaluate(model, guide, data.test, k=100)
print(f"test log p(x) (k=100): {r['test_log_likelihood']:.1f} nats = {r['test_bits_per_dim']:.3f} bits/dim")
save_image_grid(model.sample(64), Path(args.out) / "figures" / "samples.png", config.image_shape)
print(f"samples: {args.out}/figures/samples.png")
