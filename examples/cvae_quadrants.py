"""MNIST quadrant completion with the conditional VAE (Sohn et al. 2015, sec. 5.1), the task of
Pyro's CVAE tutorial: given 1, 2 or 3 quadrants of a test image (grey levels, hidden pixels -1 as
input), generate the rest. For each setting it trains a deterministic baseline net and the
``cvae-quadrant`` model (prior net p(z|x_v), generation net p(x_h|z,x_v), recognition net
q(z|x) = guide ``gaussian``) and prints the negative conditional log-likelihood -log p(x_h|x_v)
on the test images, in nats per image:

- ``-ELBO (10)``: the tutorial's measure, a 10-particle ELBO estimate (an upper bound);
- ``-log p, IS k``: importance sampling with k particles (Burda et al. 2016), tighter;

beside the tutorial's figures (NN 100.4 / 61.9 / 25.4, CVAE 71.8 / 51.0 / 24.2; 784-500-500 nets,
z 200, batch 128, lr 1e-3, up to 50 epochs with early stopping).

    python examples/cvae_quadrants.py [--epochs 1] [--quadrants 1 2 3] [--k 100] [--test-size 1000]
"""

import argparse
from pathlib import Path

import torch
from torch import nn

from pyro_vae.config import TrainConfig
from pyro_vae.data import load_dataset
from pyro_vae.evaluation import evaluate
from pyro_vae.likelihoods import make_likelihood
from pyro_vae.models.cvae import quadrant_mask
from pyro_vae.nets import MLP
from pyro_vae.plots import save_image_grid
from pyro_vae.run import load_run
from pyro_vae.schedules import KLSchedule
from pyro_vae.training import resolve_device, train, train_epoch

TUTORIAL = {1: (100.4, 71.8), 2: (61.9, 51.0), 3: (25.4, 24.2)}  # (NN baseline, CVAE), -log p(x_h|x_v)


class Baseline(nn.Module):
    """The tutorial's deterministic net: x_v (hidden pixels -1) -> MLP -> Bernoulli means of x_h;
    forward gives -log p(x_h | x_v) per image (the masked binary cross-entropy)."""

    def __init__(self, mask: torch.Tensor, hidden):
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = MLP([mask.numel(), *hidden, mask.numel()])
        self.likelihood = make_likelihood("bernoulli", mask.numel())

    def nll(self, x):
        px = self.likelihood(self.net(x.masked_fill(self.mask, -1.0)))
        return -px.base_dist.mask(self.mask).to_event(1).log_prob(x)

    def forward(self, x, beta=1.0):
        return self.nll(x).mean()


p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--quadrants", type=int, nargs="+", default=[1, 2, 3])
p.add_argument("--epochs", type=int, default=1, help="1 keeps the example under 5 minutes on 2 cores (2 took 508 s)")
p.add_argument("--baseline-epochs", type=int, default=1)
p.add_argument("--train-size", type=int)
p.add_argument("--test-size", type=int, default=1000)
p.add_argument("--k", type=int, default=100, help="importance samples for -log p(x_h|x_v)")
p.add_argument("--z-dim", type=int, default=200)
p.add_argument("--hidden", type=int, nargs="+", default=[500, 500])
p.add_argument("--device", default="auto")
p.add_argument("--out", default="runs/example-cvae-quadrants")
args = p.parse_args()

device = resolve_device(args.device)
data = load_dataset("mnist", device, train_size=args.train_size, test_size=args.test_size)
x_test = data.test
print(f"{len(data.train)} training images, {args.epochs} epochs; {len(x_test)} test images; nats per image")
print(f"{'quadrants':>9} {'NN':>8} {'CVAE -ELBO (10)':>16} {'CVAE -log p, IS k=' + str(args.k):>22} "
      f"{'tutorial NN':>12} {'tutorial CVAE':>14}")
for q in args.quadrants:
    torch.manual_seed(0)
    baseline = Baseline(quadrant_mask(data.image_shape, q), args.hidden).to(device)
    opt = torch.optim.Adam(baseline.parameters(), lr=1e-3)
    for epoch in range(1, args.baseline_epochs + 1):
        train_epoch(baseline, opt, data, 128, KLSchedule(), epoch)
    with torch.no_grad():
        nn_nll = float(torch.cat([baseline.nll(x) for x in x_test.split(1000)]).mean())

    run = Path(args.out) / f"q{q}"
    config = TrainConfig.from_dict(dict(dataset="mnist", model="cvae-quadrant", guide="gaussian", z_dim=args.z_dim,
                                        hidden=args.hidden, activation="relu", epochs=args.epochs, batch_size=128,
                                        lr=1e-3, seed=0, device=str(device), train_size=args.train_size,
                                        test_size=args.test_size, model_options={"quadrants": q}))
    train(config, run, quiet=True, overwrite=True, dataset=data)
    _, model, guide = load_run(run, device)
    torch.manual_seed(0)
    elbo10 = evaluate(model, guide, x_test, k=10)["test_elbo"]
    is_k = evaluate(model, guide, x_test, k=args.k, max_batch_particles=50_000)["test_log_likelihood"]
    nn_ref, cvae_ref = TUTORIAL[q]
    print(f"{q:>9} {nn_nll:8.1f} {-elbo10:16.1f} {-is_k:22.1f} {nn_ref:12.1f} {cvae_ref:14.1f}", flush=True)

    shown = x_test[:10]
    with torch.no_grad():
        nn_fill = torch.where(baseline.mask, torch.sigmoid(baseline.net(model.visible(shown))), shown)
    rows = [torch.where(model.hidden_mask, 0.5, shown), shown, nn_fill, *model.complete(shown, n=3)]
    save_image_grid(torch.cat(rows), run / "figures" / "completions.png", data.image_shape, nrow=10,
                    title=f"{q} quadrant(s) given: input, truth, NN, 3 CVAE draws")
