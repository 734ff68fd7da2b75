"""A plain-PyTorch VAE (no Pyro) for the same architectures, as the yardstick for pyro-vae.

The model is written out by hand: z = mu + sigma * eps, log w = log p(x|z) + log p(z) - log q(z|x);
the ELBO is the mean of log w over particles and IWAE its logmeanexp (Burda et al. 2016).
The training loop mirrors pyro_vae.train (same permutation batching, dynamic binarization,
Adam, test loss each epoch), so seconds per epoch compare like for like.

    python benchmarks/reference_torch.py --preset iwae1 --epochs 10      # quality: LL vs toolkit

trains the toolkit and this reference with the same settings in one run and prints both test
log-likelihoods (k=1000 importance samples) and their difference.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_vae.config import PRESETS  # noqa: E402
from pyro_vae.data import batch_indices, load_dataset  # noqa: E402

LOG_2PI = math.log(2 * math.pi)
ACT = {"relu": nn.ReLU, "tanh": nn.Tanh}


def mlp(sizes, act):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACT[act]())
    return nn.Sequential(*layers)


class TorchVAE(nn.Module):
    """Bernoulli VAE with a diagonal Gaussian encoder, written in plain PyTorch."""

    def __init__(self, x_dim, z_dim, hidden, activation, train_mean=None):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = mlp([x_dim, *hidden, 2 * z_dim], activation)
        self.decoder = mlp([z_dim, *hidden[::-1], x_dim], activation)
        if train_mean is not None:
            p = train_mean.clamp(1e-3, 1 - 1e-3)
            self.decoder[-1].bias.data.copy_(torch.log(p) - torch.log1p(-p))

    def log_weights(self, x, k: int = 1, stop_guide_params: bool = False, z_hook=None):
        """log p(x, z_k) - log q(z_k|x) for k reparameterized particles: shape (k, batch)."""
        loc, log_scale = self.encoder(x).chunk(2, -1)
        scale = log_scale.exp()
        eps = torch.randn(k, *loc.shape, device=x.device)
        z = loc + scale * eps
        if z_hook is not None and z.requires_grad:
            z.register_hook(z_hook)
        logits = self.decoder(z)
        log_px_z = -nn.functional.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none").sum(-1)
        log_pz = -0.5 * (z**2 + LOG_2PI).sum(-1)
        if stop_guide_params:
            loc, log_scale = loc.detach(), log_scale.detach()
            eps = (z - loc) / log_scale.exp()
        log_qz = (-0.5 * (eps**2 + LOG_2PI) - log_scale).sum(-1)
        return log_px_z + log_pz - log_qz


def elbo_loss(vae, x, k=1):
    return -vae.log_weights(x, k).mean(0).mean()


def meanfield_loss(vae, x, k=1):
    """-(E_q[log p(x|z)] - KL(q || N(0, I))) with the KL in closed form (Kingma & Welling, app. B)."""
    loc, log_scale = vae.encoder(x).chunk(2, -1)
    z = loc + log_scale.exp() * torch.randn(k, *loc.shape, device=x.device)
    logits = vae.decoder(z)
    log_px_z = -nn.functional.binary_cross_entropy_with_logits(
        logits, x.expand_as(logits), reduction="none").sum(-1).mean(0)
    kl = 0.5 * (loc**2 + (2 * log_scale).exp() - 1 - 2 * log_scale).sum(-1)
    return -(log_px_z - kl).mean()


def iwae_loss(vae, x, k):
    return -(torch.logsumexp(vae.log_weights(x, k), 0) - math.log(k)).mean()


def dreg_loss(vae, x, k):
    """Tucker et al. 2019: the guide's gradient sum_k w_k^2 d log w_k / dz dz/dphi (with log q's
    parameters stopped), the model's the IWAE gradient sum_k w_k d log w_k / dtheta."""
    weights = {}
    lw = vae.log_weights(x, k, stop_guide_params=True, z_hook=lambda g: g * weights["w"].unsqueeze(-1))
    weights["w"] = torch.softmax(lw.detach(), 0)
    return -(weights["w"] * lw).sum(0).mean()


def make_loss(name: str, k: int):
    if name == "elbo":
        return lambda vae, x: elbo_loss(vae, x, k)
    if name == "meanfield":
        return lambda vae, x: meanfield_loss(vae, x, k)
    if name == "iwae":
        return lambda vae, x: iwae_loss(vae, x, k)
    if name == "dreg":
        return lambda vae, x: dreg_loss(vae, x, k)
    raise ValueError(f"reference has no loss {name!r}")


@torch.no_grad()
def test_loss(vae, x, loss_fn, batch=1000):
    return sum(float(loss_fn(vae, x[i:i + batch])) * len(x[i:i + batch]) for i in range(0, len(x), batch)) / len(x)


@torch.no_grad()
def log_likelihood(vae, x, k=1000, max_batch_particles=100_000):
    """Importance-sampled log p(x) per data point, averaged over x."""
    chunk = max(1, max_batch_particles // k)
    out = [torch.logsumexp(vae.log_weights(x[i:i + chunk], k), 0) - math.log(k) for i in range(0, len(x), chunk)]
    return float(torch.cat(out).mean())


def train_epoch(vae, optimizer, data, batch_size, loss_fn):
    total = torch.zeros((), device=data.train.device)
    batches = batch_indices(len(data.train), batch_size, data.train.device)
    for index in batches:
        loss = loss_fn(vae, data.batch(index))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    return float(total) / len(batches)


def train_reference(data, preset="iwae1", epochs=10, batch_size=100, lr=1e-3, seed=0, loss="elbo", k=1,
                    quiet=False):
    """Train the plain-PyTorch VAE; returns (vae, metrics rows like pyro_vae.train's)."""
    torch.manual_seed(seed)
    p = PRESETS[preset]
    vae = TorchVAE(data.x_dim, p["z_dim"], p["hidden"], p["activation"],
                   data.train_mean() if p["init_output_bias"] else None).to(data.train.device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    loss_fn = make_loss(loss, k)
    rows = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        vae.train()
        train = train_epoch(vae, optimizer, data, batch_size, loss_fn)
        rows.append({"epoch": epoch, "train_loss": train, "test_loss": test_loss(vae, data.test, loss_fn),
                     "epoch_time_s": time.perf_counter() - t0})
        if not quiet:
            print(f"reference epoch {epoch:3d}  train {train:.2f}  test {rows[-1]['test_loss']:.2f}  "
                  f"{rows[-1]['epoch_time_s']:.1f}s", file=sys.stderr)
    return vae, rows


def main(argv=None):
    import pyro

    from pyro_vae.config import TrainConfig
    from pyro_vae.evaluate import evaluate
    from pyro_vae.run import load_run
    from pyro_vae.train import train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="iwae1", choices=sorted(PRESETS))
    p.add_argument("--estimator", default="elbo", help="elbo or iwae (toolkit name; K from --particles)")
    p.add_argument("--particles", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--k", type=int, default=1000, help="importance samples for the test log-likelihood")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/reference-compare")
    args = p.parse_args(argv)

    data = load_dataset("binarized-mnist", args.device)
    config = TrainConfig.from_dict(dict(preset=args.preset, estimator=args.estimator, particles=args.particles,
                                        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                        seed=args.seed, device=args.device))
    tk_rows = train(config, args.out, dataset=data)
    _, model, guide = load_run(args.out, args.device)
    vae, ref_rows = train_reference(data, args.preset, args.epochs, args.batch_size, args.lr, args.seed,
                                    args.estimator, args.particles)
    pyro.set_rng_seed(args.seed)
    tk_ll = evaluate(model, guide, data.test, k=args.k, psis=False)["test_log_likelihood"]
    torch.manual_seed(args.seed)
    ref_ll = log_likelihood(vae.eval(), data.test, k=args.k)
    tk_t = sum(r["epoch_time_s"] for r in tk_rows) / len(tk_rows)
    ref_t = sum(r["epoch_time_s"] for r in ref_rows) / len(ref_rows)
    print(f"\n{args.preset}, {args.estimator} K={args.particles}, binarized-mnist, batch {args.batch_size}, "
          f"Adam {args.lr:g}, {args.epochs} epochs, test log p(x) with k={args.k}")
    print("| implementation | final test loss | test log p(x) | s/epoch |")
    print("|---|---|---|---|")
    print(f"| pyro-vae | {tk_rows[-1]['test_loss']:.2f} | {tk_ll:.2f} | {tk_t:.2f} |")
    print(f"| plain PyTorch | {ref_rows[-1]['test_loss']:.2f} | {ref_ll:.2f} | {ref_t:.2f} |")
    print(f"difference (pyro-vae - reference): {tk_ll - ref_ll:+.2f} nats")


if __name__ == "__main__":
    main()
