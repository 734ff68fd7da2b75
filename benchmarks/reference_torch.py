"""A plain-PyTorch VAE (no Pyro) for the same architectures, as the yardstick for pyro-vae.

The model is written out by hand: z = mu + sigma * eps, log w = log p(x|z) + log p(z) - log q(z|x);
the ELBO is the mean of log w over particles and IWAE its logmeanexp (Burda et al. 2016); the
closed-form-KL and DReG (Tucker et al. 2019) losses as well. `overhead.py` times it against the
toolkit; run as a script it compares the two in quality and time:

    python benchmarks/reference_torch.py --preset iwae1 --estimators elbo --epochs 10
    python benchmarks/reference_torch.py --estimators elbo iwae:K=5 iwae:K=50 --epochs 50
    python benchmarks/reference_torch.py --estimators iwae:K=50 --epochs 2 --no-eval     # timing only

For each estimator it trains the toolkit run (``pyro_vae.training.train``) and the plain run from the
same initial weights, seed and data, epochs alternating between the two so that both see the same
machine load, then prints seconds per epoch of each (the mean over epochs; both include the
per-epoch test bound, as train() does), the median per-epoch ratio, and, unless ``--no-eval``,
the test log-likelihood of each by importance sampling with k samples.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_vae.config import PRESETS, TrainConfig, build_model_and_guide  # noqa: E402
from pyro_vae.data import batch_indices, load_dataset  # noqa: E402
from pyro_vae.evaluation import evaluate  # noqa: E402
from pyro_vae.objectives import parse_spec  # noqa: E402
from pyro_vae.run import load_run  # noqa: E402
from pyro_vae.training import resolve_device, train  # noqa: E402

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


def make_loss(name: str, k: int = 1):
    if name == "elbo":
        return lambda vae, x: elbo_loss(vae, x, k)
    if name == "meanfield":
        return lambda vae, x: meanfield_loss(vae, x, k)
    if name == "iwae":
        return lambda vae, x: iwae_loss(vae, x, k)
    if name == "dreg":
        return lambda vae, x: dreg_loss(vae, x, k)
    raise ValueError(f"the plain reference implements elbo, meanfield, iwae and dreg, not {name!r}")


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


def plain_from_toolkit(model, guide, activation: str) -> TorchVAE:
    """The hand-written VAE holding the weights of a toolkit model/guide pair (vae + gaussian)."""
    hidden = [m.out_features for m in guide.encoder.body if isinstance(m, nn.Linear)][:-1]
    net = TorchVAE(model.x_dim, model.z_dim, hidden, activation)
    for src, dst in ((guide.encoder.body, net.encoder), (model.decoder, net.decoder)):
        for s, d in zip(src.parameters(), dst.parameters(), strict=True):
            d.data.copy_(s.data)
    return net.to(next(model.parameters()).device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainTrainer:
    """The plain loop, one epoch per call (train_epoch, then the test bound, as train() does),
    with its own RNG stream so that its epochs can alternate with the toolkit's."""

    def __init__(self, net, data, spec, batch_size, lr, seed, device):
        name, opts = parse_spec(spec)
        self.loss_fn = make_loss(name, int(opts.get("K", 1)))
        self.net, self.data, self.batch_size, self.device = net, data, batch_size, device
        self.opt = torch.optim.Adam(net.parameters(), lr=lr)
        pyro.set_rng_seed(seed)
        self.rng = torch.get_rng_state()

    def epoch(self) -> float:
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        sync(self.device)
        t0 = time.perf_counter()
        train_epoch(self.net, self.opt, self.data, self.batch_size, self.loss_fn)
        self.test_loss = test_loss(self.net, self.data.test, self.loss_fn)
        sync(self.device)
        elapsed = time.perf_counter() - t0
        self.rng = torch.get_rng_state()
        torch.set_rng_state(outer)
        return elapsed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="iwae1", choices=["seed", "iwae1"])
    p.add_argument("--estimators", nargs="+", default=["iwae:K=50"],
                   help="toolkit specs: elbo, meanfield, iwae:K=k, dreg:K=k")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-size", type=int)
    p.add_argument("--test-size", type=int)
    p.add_argument("--k", type=int, default=1000, help="importance samples for the test log-likelihood")
    p.add_argument("--no-eval", action="store_true", help="timing only")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for the toolkit runs (default: a temporary folder)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    data = load_dataset("binarized-mnist", device, train_size=args.train_size, test_size=args.test_size)
    out = Path(args.out or tempfile.mkdtemp(prefix="pyro-vae-bench-"))
    print(f"{args.preset} on binarized MNIST ({len(data.train)} train, {len(data.test)} test), batch {args.batch_size}, "
          f"Adam {args.lr}, {args.epochs} epochs, device {device}, torch {torch.__version__}", flush=True)
    rows = []
    for spec in args.estimators:
        try:
            make_loss(parse_spec(spec)[0])  # fail before training on a loss the reference lacks
        except ValueError as e:
            raise SystemExit(str(e)) from None
        config = TrainConfig.from_dict(dict(preset=args.preset, dataset="binarized-mnist", estimator=spec,
                                            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                            seed=args.seed, device=str(device)))
        # the same initial weights: build the toolkit pair under the seed train() uses, copy them
        config.x_dim = data.x_dim
        pyro.set_rng_seed(args.seed)
        model, guide = build_model_and_guide(config, data.train_mean())
        net = plain_from_toolkit(model.to(device), guide.to(device), PRESETS[args.preset]["activation"])
        run = out / spec.replace(":", "_")
        plain = PlainTrainer(net, data, spec, args.batch_size, args.lr, args.seed, device)
        t_tool, t_plain = [], []
        for epoch in range(1, args.epochs + 1):  # alternate epochs: both see the same machine load
            config.epochs = epoch
            t_tool.append(train(config, run, resume=epoch > 1, quiet=True, dataset=data)[-1]["epoch_time_s"])
            t_plain.append(plain.epoch())
            print(f"  epoch {epoch}: toolkit {t_tool[-1]:.2f} s, plain {t_plain[-1]:.2f} s", flush=True)
        ratios = sorted(a / b for a, b in zip(t_tool, t_plain))
        row = {"estimator": spec, "toolkit_s": sum(t_tool) / len(t_tool), "plain_s": sum(t_plain) / len(t_plain),
               "ratio": ratios[len(ratios) // 2]}
        if not args.no_eval:
            _, model, guide = load_run(run, device)
            pyro.set_rng_seed(args.seed)
            row["toolkit_ll"] = evaluate(model, guide, data.test, args.k)["test_log_likelihood"]
            pyro.set_rng_seed(args.seed)
            row["plain_ll"] = log_likelihood(net, data.test, args.k)
        rows.append(row)
        print(_format(row), flush=True)
    return rows


def _format(r):
    s = (f"{r['estimator']:<10} toolkit {r['toolkit_s']:7.2f} s/epoch  plain {r['plain_s']:7.2f} s/epoch  "
         f"median epoch ratio {r['ratio']:.3f}")
    if "toolkit_ll" in r:
        s += (f"  test log p(x): toolkit {r['toolkit_ll']:.2f}  plain {r['plain_ll']:.2f}  "
              f"diff {r['toolkit_ll'] - r['plain_ll']:+.2f}")
    return s


if __name__ == "__main__":
    main()
