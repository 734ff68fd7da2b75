"""Seconds per epoch: the loop users write today from Pyro's VAE example against pyro-vae.

Pyro's ``examples/vae/vae.py``: torchvision ``MNIST`` with ``ToTensor`` through a per-item
``DataLoader``, ``SVI.step`` with ``Trace_ELBO`` and ``pyro.optim.Adam``, a 784-400-50
softplus VAE with a Bernoulli likelihood on grey levels, batch 256. pyro-vae trains the same
architecture on the same data with its own loop (eager and ``--jit``). Epochs alternate so
that both see the same machine load.

    python benchmarks/pyro_example_loop.py --epochs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_vae.config import TrainConfig, build_model_and_guide  # noqa: E402
from pyro_vae.data import load_dataset, mnist_arrays  # noqa: E402
from pyro_vae.objectives import Objective, make_estimator  # noqa: E402
from pyro_vae.objectives.traced import TracedObjective  # noqa: E402
from pyro_vae.schedules import KLSchedule  # noqa: E402
from pyro_vae.training import train_epoch  # noqa: E402


# ----------------------------------------------------------------- Pyro's example, as written there
class Encoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, hidden_dim), nn.Linear(hidden_dim, z_dim), nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        x = x.reshape(-1, 784)
        hidden = self.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.fc1, self.fc21 = nn.Linear(z_dim, hidden_dim), nn.Linear(hidden_dim, 784)
        self.softplus, self.sigmoid = nn.Softplus(), nn.Sigmoid()

    def forward(self, z):
        return self.sigmoid(self.fc21(self.softplus(self.fc1(z))))


class ExampleVAE(nn.Module):
    def __init__(self, z_dim=50, hidden_dim=400):
        super().__init__()
        self.encoder, self.decoder, self.z_dim = Encoder(z_dim, hidden_dim), Decoder(z_dim, hidden_dim), z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x.reshape(-1, 784))

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def torchvision_mnist(root: Path):
    """torchvision's MNIST class over the cached arrays (written as the IDX files it reads)."""
    from torchvision import datasets, transforms

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    a = mnist_arrays()
    for split, x, y in (("train", a["x_train"], a["y_train"]), ("t10k", a["x_test"], a["y_test"])):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, len(x), 28, 28) + x.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, len(y)) + y.astype("uint8").tobytes())
    return datasets.MNIST(str(root), train=True, download=False, transform=transforms.ToTensor())


def example_epoch(svi, loader):
    epoch_loss = 0.0
    for x, _ in loader:
        epoch_loss += svi.step(x)
    return epoch_loss / len(loader.dataset)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per side (after one warm-up)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for Pyro's loop")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--data-root", default="/tmp/pyro-vae-torchvision")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(torchvision_mnist(Path(args.data_root)), batch_size=args.batch_size,
                                         shuffle=True, num_workers=args.workers)
    pyro.clear_param_store()
    vae = ExampleVAE()
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), loss=Trace_ELBO())

    data = load_dataset("mnist", "cpu", test_size=1)
    config = TrainConfig.from_dict(dict(z_dim=50, hidden=[400], activation="softplus", x_dim=784))
    ours = {}
    for mode in ("eager", "jit"):
        model, guide = build_model_and_guide(config)
        objective = Objective(model, guide, make_estimator("elbo"))
        ours[mode] = (TracedObjective(objective) if mode == "jit" else objective, torch.optim.Adam(objective.parameters(), lr=1e-3))

    times = {"pyro_example": [], "eager": [], "jit": []}
    for epoch in range(args.epochs + 1):  # epoch 0 warms up
        t = time.perf_counter()
        example_epoch(svi, loader)
        t_example = time.perf_counter() - t
        measured = {}
        for mode, (objective, optimizer) in ours.items():
            t = time.perf_counter()
            train_epoch(objective, optimizer, data, args.batch_size, KLSchedule(), epoch + 1)
            measured[mode] = time.perf_counter() - t
        if epoch:
            times["pyro_example"].append(t_example)
            for mode, v in measured.items():
                times[mode].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    lines = ["| loop | s/epoch | speed-up over Pyro's example |", "|---|---|---|",
             f"| Pyro example (SVI.step, DataLoader + ToTensor, {args.workers} workers) | {med['pyro_example']:.2f} | 1.00 |",
             f"| pyro-vae | {med['eager']:.2f} | {med['pyro_example'] / med['eager']:.2f}x |",
             f"| pyro-vae --jit | {med['jit']:.2f} | {med['pyro_example'] / med['jit']:.2f}x |"]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
            "epochs_timed": args.epochs, "seconds_per_epoch": med}
    (out / "pyro-example-loop.json").write_text(json.dumps(info, indent=2))
    (out / "pyro-example-loop.md").write_text("# Pyro's example loop vs pyro-vae (CPU)\n\n" + json.dumps(info) + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
