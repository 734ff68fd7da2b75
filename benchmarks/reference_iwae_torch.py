"""The toolkit's importance-weighted estimators against a hand-written, vectorized IWAE in plain
PyTorch on the iwae1 architecture (Burda et al. 2016: 784-200-200-50, tanh), in one process.

For each estimator (``elbo`` is the plain IWAE with K = 1; ``iwae:K=k`` the plain IWAE with
K = k) it trains the toolkit run (``pyro_vae.train.train``) and the plain-PyTorch run from the
same initial weights, seed and data, epochs alternating between the two so that both see the
same machine load, then prints seconds per epoch of each (the mean over epochs; both include
the per-epoch test bound, as train() does), the median per-epoch ratio, and, unless
``--no-eval``, the test log-likelihood of each by importance sampling with k samples.

    python benchmarks/reference_iwae_torch.py --estimators iwae:K=50 --epochs 2 --no-eval
    python benchmarks/reference_iwae_torch.py --estimators elbo iwae:K=5 iwae:K=50 --epochs 50
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_torch import TorchVAE, iwae_loss, log_likelihood  # noqa: E402

from pyro_vae.config import TrainConfig, build_model_and_guide  # noqa: E402
from pyro_vae.data import batch_indices, load_dataset  # noqa: E402
from pyro_vae.evaluate import evaluate  # noqa: E402
from pyro_vae.objectives import parse_spec  # noqa: E402
from pyro_vae.run import load_run  # noqa: E402
from pyro_vae.train import resolve_device, train  # noqa: E402


def plain_from_toolkit(model, guide) -> TorchVAE:
    """The hand-written VAE of reference_torch.py holding the toolkit's iwae1 weights."""
    hidden = [m.out_features for m in guide.encoder.body if isinstance(m, nn.Linear)][:-1]
    net = TorchVAE(model.x_dim, model.z_dim, hidden, "tanh")
    copy = lambda src, dst: [d.data.copy_(s.data) for s, d in zip(src.parameters(), dst.parameters())]  # noqa: E731
    copy(guide.encoder.body, net.encoder)
    copy(model.decoder, net.decoder)
    return net.to(next(model.parameters()).device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainTrainer:
    """The plain loop: the same batching, binarization, Adam and per-epoch test bound as train(),
    one epoch per call, with its own RNG stream (so epochs can alternate with the toolkit's)."""

    def __init__(self, net, data, k, batch_size, lr, seed, device):
        self.net, self.data, self.k, self.batch_size, self.device = net, data, k, batch_size, device
        self.opt = torch.optim.Adam(net.parameters(), lr=lr)
        pyro.set_rng_seed(seed)
        self.rng = torch.get_rng_state()

    def epoch(self) -> float:
        net, data, device = self.net, self.data, self.device
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        sync(device)
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for index in batch_indices(len(data.train), self.batch_size, device):
            loss = iwae_loss(net, data.batch(index), self.k)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.detach()
        with torch.no_grad():
            self.test_loss = sum(float(iwae_loss(net, data.test[i : i + 1000], self.k)) * len(data.test[i : i + 1000])
                                 for i in range(0, len(data.test), 1000)) / len(data.test)
        float(total)
        sync(device)
        elapsed = time.perf_counter() - t0
        self.rng = torch.get_rng_state()
        torch.set_rng_state(outer)
        return elapsed


def particles(spec: str) -> int:
    name, opts = parse_spec(spec)
    if name not in ("elbo", "iwae"):
        raise SystemExit(f"the plain reference implements elbo and iwae only, not {spec!r}")
    return int(opts.get("K", 1))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--estimators", nargs="+", default=["iwae:K=50"])
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
    print(f"iwae1 on binarized MNIST ({len(data.train)} train, {len(data.test)} test), batch {args.batch_size}, "
          f"Adam {args.lr}, {args.epochs} epochs, device {device}, torch {torch.__version__}", flush=True)
    rows = []
    for spec in args.estimators:
        k = particles(spec)
        config = TrainConfig.from_dict(dict(preset="iwae1", dataset="binarized-mnist", estimator=spec,
                                            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                            seed=args.seed, device=str(device)))
        # the same initial weights: build the toolkit pair under the seed train() uses, copy them
        config.x_dim = data.x_dim
        pyro.set_rng_seed(args.seed)
        net = plain_from_toolkit(*[m.to(device) for m in build_model_and_guide(config, data.train_mean())])
        run = out / spec.replace(":", "_")
        plain = PlainTrainer(net, data, k, args.batch_size, args.lr, args.seed, device)
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
