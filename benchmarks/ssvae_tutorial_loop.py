"""Pyro's SS-VAE tutorial loop (variant 3: y summed out by TraceEnum_ELBO, plus the auxiliary
classification loss as a second SVI) re-typed in plain Pyro, beside pyro-vae's ``ssvae`` on the
same labelled rows, data and settings: test accuracy of q(y|x) per epoch.

The tutorial's schedule: Adam(lr 4.2e-4, betas (0.95, 0.999)), batch 200, 784-500 softplus
nets, z 50, aux multiplier 46, one supervised step (SVI on the ELBO, then on the auxiliary
loss) per epoch for 100 labels, spread by ``i % (50000 / labels) == 1``.

    python benchmarks/ssvae_tutorial_loop.py --labels 100 --epochs 12
"""

import argparse
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.optim import Adam
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_vae.config import TrainConfig  # noqa: E402
from pyro_vae.data import load_dataset  # noqa: E402
from pyro_vae.training import train  # noqa: E402


def _mlp(d_in, hidden, d_out):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Softplus(), nn.Linear(hidden, d_out))


class TutorialM2(nn.Module):
    def __init__(self, z_dim=50, hidden=500, classes=10, x_dim=784, aux=46.0):
        super().__init__()
        self.z_dim, self.classes, self.x_dim, self.aux = z_dim, classes, x_dim, aux
        self.encoder_y = _mlp(x_dim, hidden, classes)
        self.encoder_z = _mlp(x_dim + classes, hidden, 2 * z_dim)
        self.decoder = _mlp(z_dim + classes, hidden, x_dim)

    def model(self, xs, ys=None):
        pyro.module("m2", self)
        with pyro.plate("data", xs.shape[0]):
            z = pyro.sample("z", dist.Normal(xs.new_zeros(xs.shape[0], self.z_dim), 1.0).to_event(1))
            prior = dist.OneHotCategorical(xs.new_ones(xs.shape[0], self.classes) / self.classes)
            ys = pyro.sample("y", prior, obs=ys)
            lead = torch.broadcast_shapes(z.shape[:-1], ys.shape[:-1])
            logits = self.decoder(torch.cat([z.expand(lead + z.shape[-1:]), ys.expand(lead + ys.shape[-1:])], -1))
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=xs)

    def guide(self, xs, ys=None):
        with pyro.plate("data", xs.shape[0]):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(logits=self.encoder_y(xs)))
            lead = torch.broadcast_shapes(xs.shape[:-1], ys.shape[:-1])
            h = self.encoder_z(torch.cat([xs.expand(lead + xs.shape[-1:]), ys.expand(lead + ys.shape[-1:])], -1))
            pyro.sample("z", dist.Normal(h[..., : self.z_dim], h[..., self.z_dim :].exp()).to_event(1))

    def model_classify(self, xs, ys):
        pyro.module("m2", self)
        with pyro.plate("data", xs.shape[0]), pyro.poutine.scale(scale=self.aux):
            pyro.sample("y_aux", dist.OneHotCategorical(logits=self.encoder_y(xs)), obs=ys)

    def guide_classify(self, xs, ys):
        """The auxiliary loss has no latent sites, so its guide is empty (as in the tutorial)."""


def tutorial_loop(data, epochs, batch_size, seed):
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    m2 = TutorialM2()
    optim = Adam({"lr": 4.2e-4, "betas": (0.95, 0.999)})
    svi = SVI(m2.model, config_enumerate(m2.guide, "parallel"), optim, loss=TraceEnum_ELBO(max_plate_nesting=1))
    aux = SVI(m2.model_classify, m2.guide_classify, optim, loss=Trace_ELBO())
    rows = data.labelled_rows
    x_l, y_l = data.train[rows], nn.functional.one_hot(data.train_labels[rows], 10).float()
    unlabelled = torch.ones(len(data.train), dtype=torch.bool)
    unlabelled[rows] = False
    x_u = data.train[unlabelled]
    sup_batches = -(-len(rows) // batch_size)
    period = len(data.train) // len(rows)
    accuracies = []
    with pyro.validation_enabled(False):
        for _ in range(epochs):
            perm, sup_perm, seen = torch.randperm(len(x_u)), torch.randperm(len(rows)), 0
            unsup_batches = -(-len(x_u) // batch_size)
            for i in range(unsup_batches + sup_batches):
                if i % period == 1 and seen < sup_batches:
                    b = sup_perm[seen * batch_size : (seen + 1) * batch_size]
                    svi.step(x_l[b], y_l[b])
                    aux.step(x_l[b], y_l[b])
                    seen += 1
                else:
                    j = i - seen
                    svi.step(x_u[perm[j * batch_size : (j + 1) * batch_size]])
            with torch.no_grad():
                accuracies.append(float((m2.encoder_y(data.test).argmax(-1) == data.test_labels).float().mean()))
            print(f"  tutorial loop epoch {len(accuracies)}: test accuracy {accuracies[-1]:.4f}", flush=True)
    return accuracies


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=int, default=100)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-ssvae")
    args = p.parse_args(argv)
    # the tutorial's split: 50,000 training images (10,000 held out), grey levels in [0, 1]
    full = load_dataset("mnist", "cpu", validation=10000)
    tutorial = tutorial_loop(full.keep_labels(args.labels, args.seed), args.epochs, args.batch_size, args.seed)
    config = TrainConfig.from_dict(dict(dataset="mnist", validation=10000, model="ssvae", guide="ssvae",
                                        estimator="enum", labels=args.labels, z_dim=50, hidden=[500],
                                        activation="softplus", epochs=args.epochs, batch_size=args.batch_size,
                                        lr=4.2e-4, seed=args.seed, device="cpu"))
    ours = [r["test_accuracy"] for r in train(config, args.out, quiet=True, dataset=full)]  # keeps the same labels
    print(f"{'epoch':>5} {'tutorial loop':>14} {'pyro-vae ssvae':>15}")
    for e, (a, b) in enumerate(zip(tutorial, ours), 1):
        print(f"{e:5d} {a:14.4f} {b:15.4f}")


if __name__ == "__main__":
    main()
