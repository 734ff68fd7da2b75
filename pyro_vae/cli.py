"""The ``pyro-vae`` command: parse, call the library, print. Subcommands:
train, eval, sample, reconstruct, demo."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

TRAIN_FLAGS = {
    # name: (type, help)  -- every TrainConfig field, one flag each
    "dataset": (str, "mnist, binarized-mnist, or a .npy/.pt file or image folder"),
    "data_dir": (str, "MNIST cache folder (default $PYRO_VAE_DATA or ~/.cache/pyro-vae)"),
    "validation": (int, "hold out the last N training points for validation"),
    "train_size": (int, "use only the first N training points"),
    "test_size": (int, "use only the first N test points"),
    "image_size": (int, "resize image-folder images to N x N"),
    "preset": (str, "architecture preset: seed (784-400-20, ReLU), iwae1 (784-200-200-50, tanh) or iwae2 (two stochastic layers)"),
    "model": (str, "model name (vae, linear, hvae2) or package.module:Class"),
    "guide": (str, "guide name (gaussian, hvae2) or package.module:Class"),
    "z_dim": (int, "latent dimensions"),
    "hidden": (int, "hidden layer sizes, e.g. --hidden 200 200"),
    "activation": (str, "relu, tanh, softplus, elu, gelu, silu, leaky_relu"),
    "likelihood": (str, "bernoulli, continuous-bernoulli, gaussian"),
    "init_output_bias": (bool, "initialise the decoder output bias from the training mean"),
    "estimator": (str, "elbo, meanfield, ... with options, e.g. iwae:K=50"),
    "particles": (int, "particles K per data point (vectorized)"),
    "beta": (float, "KL weight (beta-VAE); the target of a warm-up"),
    "warmup_epochs": (int, "raise beta linearly from 0 over N epochs"),
    "epochs": (int, "number of epochs"),
    "batch_size": (int, "data points per step"),
    "lr": (float, "Adam learning rate"),
    "weight_decay": (float, "Adam weight decay"),
    "clip_grad": (float, "clip the gradient norm to this value"),
    "seed": (int, "random seed (identical runs on CPU)"),
    "device": (str, "auto, cpu, cuda or cuda:N"),
}


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from pyro_vae.config import TrainConfig

    defaults = TrainConfig()
    for name, (typ, help_) in TRAIN_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        text = f"{help_} (default: {default})"
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif name == "hidden":
            p.add_argument(flag, type=int, nargs="+", default=None, help=text)
        else:
            p.add_argument(flag, type=typ, default=None, help=text)


def _train_config(args):
    from pyro_vae.config import TrainConfig

    given = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    if args.config:
        return TrainConfig.from_toml(args.config, **given)
    return TrainConfig.from_dict(given)


def cmd_train(args) -> int:
    from pyro_vae.run import load_config
    from pyro_vae.train import train

    if args.resume:
        config = load_config(args.resume)
        overrides = {k: getattr(args, k) for k in ("epochs", "device") if getattr(args, k) is not None}
        for k, v in overrides.items():
            setattr(config, k, v)
        run_dir = Path(args.resume)
    else:
        config = _train_config(args)
        run_dir = Path(args.out or f"runs/{config.model}-{config.estimator.replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        train(config, run_dir, resume=bool(args.resume), quiet=args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last finished epoch is saved in {run_dir}; continue with "
              f"`pyro-vae train --resume {run_dir}`", file=sys.stderr)
        return 130
    print(f"run directory: {run_dir}")
    return 0


def cmd_eval(args) -> int:
    from pyro_vae.evaluate import evaluate_run

    r = evaluate_run(args.run, k=args.k, device=args.device, seed=args.seed, test_size=args.test_size,
                     max_batch_particles=args.max_batch_particles, progress=not args.quiet,
                     max_memory=args.max_memory, export_points=args.export_points)
    print(format_eval_table(r))
    print(f"written to {Path(args.run) / 'eval.json'}")
    return 0


def format_eval_table(r: dict) -> str:
    """The figures of an evaluation as aligned text: scalars, then per-site summaries."""
    rows = []
    for key, value in r.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float):
            rows.append((key, f"{value:.4f}"))
        elif isinstance(value, (int, str)):
            rows.append((key, str(value)))
        elif key in ("kl_per_site", "active_units_per_site", "kl_method"):
            rows.extend((f"{key}[{s}]", f"{v:.4f}" if isinstance(v, float) else str(v)) for s, v in value.items())
        elif key == "kl_per_dim":
            for s, v in value.items():
                top = sorted(v, reverse=True)[:5]
                rows.append((f"{key}[{s}] (largest 5)", " ".join(f"{t:.2f}" for t in top)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _loaded(args):
    import pyro

    from pyro_vae.run import load_run
    from pyro_vae.train import resolve_device

    pyro.set_rng_seed(args.seed)
    return load_run(args.run, resolve_device(args.device))


def cmd_sample(args) -> int:
    from pyro_vae.plots import save_image_grid

    config, model, _ = _loaded(args)
    out = Path(args.out or Path(args.run) / "figures" / "samples.png")
    save_image_grid(model.sample(args.n), out, config.image_shape, title=f"{args.n} samples from the prior")
    print(out)
    return 0


def cmd_reconstruct(args) -> int:
    import torch

    from pyro_vae.data import load_dataset
    from pyro_vae.plots import save_reconstructions

    config, model, guide = _loaded(args)
    data = load_dataset(config.dataset, next(model.parameters()).device, config.data_dir, train_size=1,
                        test_size=args.n, image_size=config.image_size)
    with torch.no_grad():
        recon = model.decode(guide.posterior(data.test).mean).mean
    out = Path(args.out or Path(args.run) / "figures" / "reconstructions.png")
    save_reconstructions(data.test, recon, out, config.image_shape)
    print(out)
    return 0


def cmd_demo(args) -> int:
    """Train the iwae1 VAE on binarized MNIST, evaluate, draw pictures, summarise."""
    from pyro_vae.config import TrainConfig
    from pyro_vae.evaluate import evaluate_run
    from pyro_vae.plots import save_training_curve
    from pyro_vae.run import read_metrics
    from pyro_vae.train import train

    run = Path(args.out)
    config = TrainConfig.from_dict(dict(preset="iwae1", dataset="binarized-mnist", epochs=args.epochs,
                                        batch_size=100, lr=1e-3, estimator="elbo", seed=0, device=args.device))
    t0 = time.perf_counter()
    print(f"training the iwae1 VAE (784-200-200-50, tanh) on binarized MNIST for {args.epochs} epochs ...")
    train(config, run, quiet=args.quiet)
    print(f"evaluating log p(x) on the 10,000 test images with k={args.k} importance samples ...")
    result = evaluate_run(run, k=args.k, device=args.device, progress=not args.quiet)
    ns = argparse.Namespace(run=str(run), seed=0, device=args.device, n=64, out=None)
    cmd_sample(ns)
    ns.n = 32
    cmd_reconstruct(ns)
    save_training_curve(read_metrics(run), run / "figures" / "training_curve.png")
    print(f"\nsummary ({time.perf_counter() - t0:.0f} s)\n"
          f"  test ELBO                {result['test_elbo']:.2f} nats\n"
          f"  test log p(x), k={args.k:<6} {result['test_log_likelihood']:.2f} nats "
          f"({result['test_bits_per_dim']:.4f} bits/dim)\n"
          f"  run directory            {run}\n"
          f"  figures                  {run / 'figures'}/samples.png, reconstructions.png, training_curve.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyro-vae", description="Variational autoencoders as Pyro programs.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model/guide pair with SVI",
                       description="Train a VAE with SVI on any estimator; writes a run directory.")
    _add_train_flags(t)
    t.add_argument("--config", help="a TOML file of the same keys as the flags (flags win)")
    t.add_argument("--out", help="run directory (default runs/MODEL-ESTIMATOR-TIME)")
    t.add_argument("--resume", metavar="RUN", help="continue the run in RUN (--epochs may extend it)")
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    t.set_defaults(func=cmd_train)

    def run_parser(name, help_, func):
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("run", help="run directory written by `pyro-vae train`")
        s.add_argument("--device", default="auto")
        s.add_argument("--seed", type=int, default=0)
        s.set_defaults(func=func)
        return s

    e = run_parser("eval", "test ELBO and importance-sampled test log-likelihood; writes RUN/eval.json", cmd_eval)
    e.add_argument("--k", type=int, default=1000, help="importance samples per test point")
    e.add_argument("--test-size", type=int, help="evaluate on the first N test points only")
    e.add_argument("--max-batch-particles", type=int, default=100_000,
                   help="data points x particles in flight at once (bounds memory)")
    e.add_argument("--max-memory", default=None,
                   help="bound on the evaluation's working memory, e.g. 1GB or 512MB; chunk sizes "
                        "follow from a measured probe (overrides --max-batch-particles)")
    e.add_argument("--export-points", type=int, nargs="*", default=[0, 1, 2, 3],
                   help="test points whose draws z and log weights go to RUN/posterior.nc (ArviZ)")
    e.add_argument("--quiet", action="store_true")
    s = run_parser("sample", "a grid PNG of samples drawn from the prior", cmd_sample)
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--out", help="PNG path (default RUN/figures/samples.png)")
    r = run_parser("reconstruct", "test images beside their reconstructions, as a PNG", cmd_reconstruct)
    r.add_argument("--n", type=int, default=32)
    r.add_argument("--out", help="PNG path (default RUN/figures/reconstructions.png)")

    d = sub.add_parser("demo", help="train, evaluate and draw the iwae1 VAE on binarized MNIST",
                       description=cmd_demo.__doc__)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=int, default=20)
    d.add_argument("--k", type=int, default=1000)
    d.add_argument("--device", default="auto")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    from pyro_vae.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"pyro-vae {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
