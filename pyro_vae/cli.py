"""The ``pyro-vae`` command: parse, call the library, print. Subcommands:
train, eval, sample, reconstruct, interpolate, traverse, impute, anomaly, represent, disentangle, encode,
decode, prior, compare, demo."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from pyro_vae.errors import ConfigError
from pyro_vae.settings import Setting


def checked(kind: type, **bounds):
    """An argparse type: text to a ``kind`` within ``bounds`` (see ``settings.Setting``)."""
    return Setting("", kind=kind, **bounds).parse()


POSITIVE, COUNT = checked(int, at_least=1), checked(int, at_least=0)

TRUST_HELP = ("import the model and guide that RUN/config.json names by import path (package.module:Class), "
              "from installed packages and PYTHONPATH only; without it such a run is refused, since "
              "importing runs that code. Built-in names need no flag")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every TrainConfig setting (generated from its declaration), and
    --model-option/--guide-option."""
    from pyro_vae.config import TrainConfig
    from pyro_vae.settings import add_flags

    p.set_defaults(train_flags=add_flags(p, TrainConfig))
    for kind in ("model", "guide"):
        p.add_argument(f"--{kind}-option", dest=f"{kind}_option", metavar="KEY=VALUE", action="append",
                       default=None, help=f"an argument of the {kind}'s constructor, e.g. --{kind}-option "
                                          f"hidden_dim=400 (repeatable; joins the config's {kind}_options)")


def _given_settings(args) -> dict:
    """The settings of --config FILE (if given) with the flags given on the command line winning."""
    import tomllib

    from pyro_vae.config import check_settings

    given = {}
    if args.config:
        try:
            with open(args.config, "rb") as f:
                given = {k.replace("-", "_"): v for k, v in tomllib.load(f).items()}
        except OSError as e:
            raise ConfigError(f"cannot read --config {args.config}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {args.config} is not valid TOML: {e}") from None
        try:
            check_settings(given)  # each key of the file, even where a flag overrides it
        except ConfigError as e:
            raise ConfigError(f"{args.config}: {e}") from None
    given.update({k: getattr(args, k) for k in args.train_flags if getattr(args, k) is not None})
    for kind in ("model", "guide"):
        options = _key_values(getattr(args, f"{kind}_option", None) or [], f"--{kind}-option")
        if options:
            given[f"{kind}_options"] = {**given.get(f"{kind}_options", {}), **options}
    return given


def _train_config(args):
    from pyro_vae.config import TrainConfig

    return TrainConfig.from_dict(_given_settings(args))  # each key already checked; now they together


def _resume_config(args):
    """The run's config with the given settings on top; ``train`` refuses those that a resume
    may not change (they define the run's model or data), by name."""
    from pyro_vae.config import TrainConfig
    from pyro_vae.run import load_config

    run = args.resume
    if args.out and Path(args.out).resolve() != Path(run).resolve():
        raise ConfigError(f"--resume {run} continues that run in place: leave out --out {args.out} "
                          f"(or start a new run with --out alone)")
    saved = load_config(run).to_dict()
    given = _given_settings(args)
    for kind in ("model", "guide"):
        if f"{kind}_options" in given:
            given[f"{kind}_options"] = {**saved[f"{kind}_options"], **given[f"{kind}_options"]}
    return TrainConfig.from_dict({**saved, **given})


def _key_values(items, flag: str) -> dict:
    """``["hidden_dim=400", "name=x"]`` -> {"hidden_dim": 400, "name": "x"} (numbers and true/false read
    as such)."""
    from pyro_vae.objectives import parse_spec

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{flag} {item!r} must look like KEY=VALUE, e.g. {flag} hidden_dim=400")
        key, value = (part.strip() for part in item.split("=", 1))
        lowered = value.lower()
        out[key] = {"true": True, "false": False}.get(lowered, parse_spec(f"_:{key}={value}")[1][key])
    return out


ELASTIC_OUT = "PYRO_VAE_ELASTIC_OUT"  # set by the launcher: the run directory this launch may write


def _without_flag(argv: list[str], flag: str) -> list[str]:
    """argv without ``flag VALUE`` or ``flag=VALUE``."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == flag:
            skip = True
        elif not item.startswith(flag + "="):
            out.append(item)
    return out


def _launch_torchrun(args) -> int:
    """`pyro-vae train --nproc N [--max-restarts R] ...`: start N processes of the same command
    through torchrun. The run directory is checked here, once, before any process starts; when
    torchrun restarts the group after a worker died, the workers resume from the run's last
    checkpoint (or start afresh where none was saved)."""
    import os
    import subprocess

    from pyro_vae.run import claim_run_dir

    argv = _without_flag(_without_flag(args.argv, "--nproc"), "--max-restarts")
    out = args.resume or args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-ddp{args.nproc}"
    if not args.resume and not args.out:  # every rank must agree on the run directory
        argv += ["--out", out]
    claim_run_dir(out, args.overwrite, bool(args.resume))  # refuses now rather than in every restart
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
           "--max-restarts", str(args.max_restarts), "-m", "pyro_vae", *argv]
    print("launching:", " ".join(cmd), file=sys.stderr)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           ELASTIC_OUT: str(Path(out).resolve())}
    return subprocess.call(cmd, env=env)


def _elastic_restart(args) -> None:
    """In a group that torchrun restarted after a failure (``TORCHELASTIC_RESTART_COUNT`` > 0)
    of a launch by ``--nproc``: resume the run from its last checkpoint, or start it afresh
    where no epoch was saved. A restart never touches another folder."""
    import os

    from pyro_vae.run import CHECKPOINT

    out = args.resume or args.out
    if (int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0 or not out
            or os.environ.get(ELASTIC_OUT) != str(Path(out).resolve())):
        return
    if (Path(out) / CHECKPOINT).exists():
        # the code the run names is what this same command named: trusted as it was at the start
        args.resume, args.out, args.overwrite, args.trust_code = out, None, False, True
    elif not args.resume:
        args.overwrite = True  # the failed attempt saved no epoch: its leftovers go


PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
             "NCCL communicator was aborted")


def _peer_lost(e: BaseException) -> bool:
    """A collective of a distributed run failed because another process is gone."""
    import torch.distributed

    return torch.distributed.is_initialized() and any(m in str(e) for m in PEER_LOST)


def cmd_train(args) -> int:
    import os

    from pyro_vae.run import import_run_code
    from pyro_vae.training import TrainingInterrupted, train

    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args)
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out is empty: give the folder for the run, e.g. --out runs/mine")
    if args.resume and args.overwrite:
        raise ConfigError("--overwrite replaces a run and --resume continues it: give one of them")
    if args.max_restarts and not args.nproc:
        raise ConfigError("--max-restarts restarts the processes that --nproc N starts: add --nproc N (N >= 2)")
    _elastic_restart(args)

    if args.resume:
        config = _resume_config(args)
        run_dir = Path(args.resume)
        import_run_code(config, run_dir, args.trust_code)  # the run names code: only with --trust-code
    else:
        config = _train_config(args)
        run_dir = Path(args.out or f"runs/{config.model}-{config.estimator.replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}")
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        train(config, run_dir, resume=bool(args.resume), quiet=args.quiet, overwrite=args.overwrite)
        if not main_rank:
            return 0
    except KeyboardInterrupt as e:
        if main_rank:
            said = str(e) if isinstance(e, TrainingInterrupted) else "interrupted: nothing was written"
            print(f"\n{said}", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if not _peer_lost(e):
            raise
        rank = os.environ.get("RANK", "0")
        detail = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0]).split(". ")[0]  # gloo's source path
        print(f"pyro-vae train (process {rank}): another process of this run stopped or was killed "
              f"({detail}); the run's last checkpoint is intact: continue with "
              f"`pyro-vae train --resume {run_dir} --nproc N` (or --max-restarts R restarts by itself)",
              file=sys.stderr)
        return 1
    finally:
        import torch.distributed

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(f"run directory: {run_dir}")
    return 0


def cmd_eval(args) -> int:
    from pyro_vae.evaluation import evaluate_run

    r = evaluate_run(args.run, k=args.k, device=args.device, seed=args.seed, test_size=args.test_size,
                     max_batch_particles=args.max_batch_particles, progress=not args.quiet,
                     max_memory=args.max_memory, export_points=args.export_points, best=args.best,
                     trust_code=args.trust_code)
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
    """(config, model, guide, device) of the run a command reads."""
    from pyro_vae.applications import open_run

    return open_run(args.run, args.device, args.seed, args.best, getattr(args, "trust_code", False))


def _written(*paths) -> None:
    print(" ".join(str(p) for p in paths))


def cmd_sample(args) -> int:
    if getattr(args, "prior", None):  # latents from a second stage (pyro_vae/cli_latents.py)
        from pyro_vae.cli_latents import cmd_sample_prior

        return cmd_sample_prior(args)
    from pyro_vae.figures import sample_figure

    _written(sample_figure(args.run, _loaded(args), args.n, args.label, args.out))
    return 0


def cmd_reconstruct(args) -> int:
    from pyro_vae.figures import reconstruction_figure

    _written(reconstruction_figure(args.run, _loaded(args), args.n, args.out))
    return 0


def cmd_interpolate(args) -> int:
    from pyro_vae.figures import interpolation_figure

    _written(interpolation_figure(args.run, _loaded(args), args.pairs, args.steps, args.method, args.out))
    return 0


def cmd_traverse(args) -> int:
    from pyro_vae.figures import traversal_figure

    _written(traversal_figure(args.run, _loaded(args), args.index, args.dims, args.num_dims, args.span, args.steps,
                              args.out))
    return 0


def cmd_disentangle(args) -> int:
    from pyro_vae.applications import disentangle_run

    r = disentangle_run(args.run, args.points, args.seed, args.device, args.best, args.trust_code, args.span,
                        args.steps, args.index)
    rows = [(key, f"{r[key]:.4f}") for key in ("mig", "beta_vae_score", "factor_vae_score", "dci_disentanglement",
                                               "dci_completeness", "dci_informativeness_test", "sap", "reconstruction")]
    if r.get("total_correlation") is not None:
        rows.append(("total correlation (nats)", f"{r['total_correlation']:.4f}"))
    rows += [("points", str(r["points"])), ("active codes (FactorVAE)", f"{r['active_codes']} of {r['latent_dims']}"),
             ("factor per code", " ".join(f"z{j}:{name}" for j, name in enumerate(r["captured_factor"])))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    _written(Path(args.run) / "disentangle.json", r.get("traversal_figure", ""))
    return 0


def cmd_impute(args) -> int:
    from pyro_vae.applications import impute_run

    r = impute_run(args.run, args.missing, args.fraction, args.n, args.steps, args.burn_in, args.method,
                   args.seed, args.device, args.out, args.best, args.trust_code)
    print(f"RMSE on the missing features: {r['rmse_imputed_mean']:.4f} (the training mean: "
          f"{r['rmse_training_mean']:.4f}); acceptance {r['acceptance']:.2f}")
    print(f"written: {Path(args.run) / 'impute.json'}, {r['figure']}")
    return 0


def cmd_anomaly(args) -> int:
    from pyro_vae.applications import anomaly_run

    r = anomaly_run(args.run, args.k, args.data, args.test_size, args.seed, args.device, args.out, args.best,
                    args.trust_code)
    if "auroc_other_classes" in r:
        print(f"AUROC, test classes outside {r['trained_classes']} against those inside: {r['auroc_other_classes']:.4f}")
    if "auroc_data" in r:
        print(f"AUROC, {r['data']} ({r['data_points']} points) against the test set: {r['auroc_data']:.4f}")
    print(f"scores: -log p(x) (nats); median {r['median_score']:.2f}, 99th percentile {r['score_99th_percentile']:.2f}")
    print(f"written: {Path(args.run) / 'anomaly.json'}, {Path(args.run) / 'anomaly_scores.npz'}, {r['figure']}")
    return 0


def cmd_represent(args) -> int:
    from pyro_vae.applications import represent_run

    r = represent_run(args.run, args.labels, args.seed, args.device, args.best, args.trust_code)
    print(f"linear-probe test accuracy ({r['test_points']} test points): codes E_q[z|x] ({r['latent_dims']} dims) "
          f"against the raw features ({r['raw_dims']})")
    print(f"{'labels':>7} {'codes':>7} {'raw':>7}")
    for row in r["rows"]:
        print(f"{row['labels']:>7} {row['latent_accuracy']:7.4f} {row['raw_accuracy']:7.4f}")
    print(f"written: {Path(args.run) / 'represent.json'}")
    return 0


def cmd_demo(args) -> int:
    """Train the iwae1 VAE on binarized MNIST, evaluate, draw pictures, summarise."""
    from pyro_vae import figures
    from pyro_vae.applications import open_run
    from pyro_vae.config import TrainConfig
    from pyro_vae.evaluation import evaluate_run
    from pyro_vae.plots import save_training_curve
    from pyro_vae.run import RunDirError, holds_run, read_metrics
    from pyro_vae.training import train

    run = Path(args.out)
    if holds_run(run) and not args.overwrite:
        raise RunDirError(f"{run} already holds a run: replace it with --overwrite, or give another --out")
    config = TrainConfig.from_dict(dict(preset="iwae1", dataset="binarized-mnist", epochs=args.epochs,
                                        batch_size=100, lr=1e-3, estimator="elbo", seed=0, device=args.device))
    t0 = time.perf_counter()
    print(f"training the iwae1 VAE (784-200-200-50, tanh) on binarized MNIST for {args.epochs} epochs ...")
    train(config, run, quiet=args.quiet, overwrite=args.overwrite)
    print(f"evaluating log p(x) on the 10,000 test images with k={args.k} importance samples ...")
    result = evaluate_run(run, k=args.k, device=args.device, progress=not args.quiet)
    opened = open_run(run, args.device)
    _written(figures.sample_figure(run, opened, n=64))
    _written(figures.reconstruction_figure(run, opened, n=32))
    _written(figures.interpolation_figure(run, opened, pairs=8, steps=10))
    _written(figures.traversal_figure(run, opened, steps=9))
    save_training_curve(read_metrics(run), run / "figures" / "training_curve.png")
    print(f"\nsummary ({time.perf_counter() - t0:.0f} s)\n"
          f"  test ELBO                {result['test_elbo']:.2f} nats\n"
          f"  test log p(x), k={args.k:<6} {result['test_log_likelihood']:.2f} nats "
          f"({result['test_bits_per_dim']:.4f} bits/dim)\n"
          f"  active units             {result['active_units']} of 50\n"
          f"  PSIS k-hat > 0.7         {100 * result['share_khat_above_0.7']:.1f}% of test points\n"
          f"  run directory            {run} (eval.json, metrics.jsonl, posterior.nc)\n"
          f"  figures                  {run / 'figures'}/samples.png, reconstructions.png, interpolations.png,\n"
          f"                           traversals.png, training_curve.png, kl_per_dim.png, pareto_k.png")
    return 0


def cmd_compare(args) -> int:
    """Train one run per estimator (same seed, architecture, initial weights) and compare them."""
    from pyro_vae.compare import compare

    config = _train_config(args)
    out = Path(args.out)
    rows = compare(config, args.estimators, out, k=args.k, snr_repeats=args.snr_repeats,
                   snr_ks=args.snr_k, quiet=args.quiet, overwrite=args.overwrite)
    width = max(len(r["estimator"]) for r in rows)
    print(f"{'estimator':<{width}}  test log p(x)  test bound  s/epoch")
    for r in rows:
        print(f"{r['estimator']:<{width}}  {r['test_log_likelihood']:13.2f}  {r['test_bound']:10.2f}  "
              f"{r['seconds_per_epoch']:7.2f}")
    print(f"written: {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'figures'}/compare_*.png")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where the flags are listed (not the
    whole usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from pyro_vae import __version__
    from pyro_vae.cli_latents import add_latent_commands

    p = Parser(prog="pyro-vae", description="Variational autoencoders as Pyro programs.")
    p.add_argument("--version", action="version", version=f"pyro-vae {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_train_command(sub)
    _add_eval_command(sub)
    _add_figure_commands(sub)
    _add_application_commands(sub)
    add_latent_commands(sub, lambda *a: _run_parser(sub, *a))  # encode, decode, prior
    _add_compare_command(sub)
    _add_demo_command(sub)
    return p


def _run_parser(sub, name: str, help_: str, func):
    """A subcommand that reads a run directory, with the flags they all share."""
    s = sub.add_parser(name, help=help_, description=help_)
    s.add_argument("run", help="run directory written by `pyro-vae train`")
    s.add_argument("--device", default="auto")
    s.add_argument("--seed", type=COUNT, default=0)
    s.add_argument("--best", action="store_true",
                   help="use the best validation epoch's weights (RUN/best.pt) instead of the last epoch's")
    s.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    s.set_defaults(func=func)
    return s


def _add_train_command(sub) -> None:
    """train: the training settings' flags (from their declarations) and the run's."""
    from pyro_vae.config import resumable_flags

    t = sub.add_parser("train", help="train a model/guide pair with SVI",
                       description="Train a VAE with SVI on any estimator; writes a run directory.")
    _add_train_flags(t)
    t.add_argument("--config", help="a TOML file of the same keys as the flags (flags win)")
    t.add_argument("--out", help="run directory (default runs/MODEL-ESTIMATOR-TIME)")
    t.add_argument("--resume", metavar="RUN", help="continue the run in RUN; of the settings, only "
                   + ", ".join(resumable_flags()) + " may change (e.g. --epochs "
                   "extends it, a lower --lr after a divergence); the others define the run and are refused")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its files are removed once the new run has started)")
    t.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    t.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    t.add_argument("--nproc", type=POSITIVE, help="train with N processes (DistributedDataParallel through "
                   "torchrun; gloo on CPU, nccl on CUDA). Multi-node: run torchrun yourself")
    t.add_argument("--max-restarts", type=COUNT, default=0,
                   help="with --nproc: when a process dies, restart the group up to R times; the restarted "
                        "processes resume from the run's last checkpoint (torchrun's elastic restarts)")
    t.set_defaults(func=cmd_train)


def _add_eval_command(sub) -> None:
    """eval: the importance-sampled log-likelihood and diagnostics."""
    e = _run_parser(sub, "eval", "test ELBO and importance-sampled test log-likelihood; writes RUN/eval.json", cmd_eval)
    e.add_argument("--k", type=POSITIVE, default=1000, help="importance samples per test point")
    e.add_argument("--test-size", type=POSITIVE, help="evaluate on the first N test points only")
    e.add_argument("--max-batch-particles", type=POSITIVE, default=100_000,
                   help="data points x particles in flight at once (bounds memory)")
    e.add_argument("--max-memory", default=None,
                   help="bound on the evaluation's working memory, e.g. 1GB or 512MB; chunk sizes "
                        "follow from a measured probe (overrides --max-batch-particles)")
    e.add_argument("--export-points", type=COUNT, nargs="*", default=[0, 1, 2, 3],
                   help="test points whose draws z and log weights go to RUN/posterior.nc (ArviZ)")
    e.add_argument("--quiet", action="store_true")


def _add_figure_commands(sub) -> None:
    """sample, reconstruct, interpolate, traverse: the pictures of ``figures.py``."""
    s = _run_parser(sub, "sample", "samples drawn from the prior: a grid PNG for images; RUN/samples.npy and a scatter "
                   "plot of pairs of features otherwise", cmd_sample)
    s.add_argument("--n", type=POSITIVE, default=64)
    s.add_argument("--label", type=COUNT, help="the class to draw, for class-conditional models (cvae, ssvae)")
    s.add_argument("--out", help="PNG path (default RUN/figures/samples.png)")
    from pyro_vae.cli_latents import add_sample_prior_flags

    add_sample_prior_flags(s)
    r = _run_parser(sub, "reconstruct", "test points beside their reconstructions E[x | z = E_q[z|x]]: a PNG grid for "
                   "images; RUN/reconstructions.npy and a scatter plot otherwise", cmd_reconstruct)
    r.add_argument("--n", type=POSITIVE, default=32)
    r.add_argument("--out", help="PNG path (default RUN/figures/reconstructions.png)")
    i = _run_parser(sub, "interpolate", "decoded paths between the codes of pairs of test points: a PNG (and "
                   "RUN/interpolations.npy where the features are not an image)", cmd_interpolate)
    i.add_argument("--pairs", type=POSITIVE, default=8)
    i.add_argument("--steps", type=checked(int, at_least=2), default=10, help="points on each path, its ends included")
    i.add_argument("--method", choices=["slerp", "linear"], default="slerp",
                   help="spherical (White 2016; the default) or straight-line interpolation")
    i.add_argument("--out", help="PNG path (default RUN/figures/interpolations.png)")
    v = _run_parser(sub, "traverse", "latent traversals: one test point's code, one dimension varied per row: a PNG "
                   "(and RUN/traversals.npy where the features are not an image)", cmd_traverse)
    v.add_argument("--index", type=COUNT, default=0, help="the test point")
    v.add_argument("--dims", type=COUNT, nargs="+", help="latent dimensions (default: the --num-dims most active)")
    v.add_argument("--num-dims", type=POSITIVE, default=8)
    v.add_argument("--span", type=checked(float, above=0), default=3.0, help="values from -span to span (prior standard deviations)")
    v.add_argument("--steps", type=checked(int, at_least=2), default=9)
    v.add_argument("--out", help="PNG path (default RUN/figures/traversals.png)")


def _add_application_commands(sub) -> None:
    """impute, represent, anomaly, disentangle."""
    m = _run_parser(sub, "impute", "fill in missing features of test points from p(x_m | x_o) (Metropolis-within-Gibbs); "
                   "writes RUN/impute.json", cmd_impute)
    m.add_argument("--missing", choices=["bottom-half", "right-half", "random"], default=None,
                   help="which features are missing (the halves need images; default: bottom-half for images, "
                        "random otherwise)")
    m.add_argument("--fraction", type=checked(float, above=0, at_most=0.999999), default=0.5, help="share of missing features, with --missing random")
    m.add_argument("--n", type=POSITIVE, default=100, help="test points")
    m.add_argument("--steps", type=POSITIVE, default=500, help="sampler steps")
    m.add_argument("--burn-in", type=COUNT, default=100, help="first steps left out of E[x_m | x_o]")
    m.add_argument("--method", choices=["mwg", "pseudo-gibbs"], default="mwg",
                   help="Metropolis-within-Gibbs (Mattei & Frellsen 2018; exact for any guide) or "
                        "pseudo-Gibbs (Rezende et al. 2014; exact only with the exact posterior)")
    m.add_argument("--out", help="PNG path (default RUN/figures/imputations.png)")
    e2 = _run_parser(sub, "represent", "linear-probe accuracy of the codes E_q[z|x] against the raw features, with N "
                    "labelled training points; writes RUN/represent.json", cmd_represent)
    e2.add_argument("--labels", type=POSITIVE, nargs="+", default=[100, 1000, 10000],
                    help="labelled training points for the probe, a multiple of the classes each")
    a = _run_parser(sub, "anomaly", "anomaly scores -log p(x) of the test set (and --data); AUROC against held-out "
                   "classes of a --classes run; writes RUN/anomaly.json", cmd_anomaly)
    a.add_argument("--k", type=POSITIVE, default=100, help="importance samples per point")
    a.add_argument("--data", help="a .npy or .pt file of points to score against the test set")
    a.add_argument("--test-size", type=POSITIVE, help="score the first N test points only")
    a.add_argument("--out", help="PNG path (default RUN/figures/anomalies.png)")

    g = _run_parser(sub, "disentangle", "disentanglement metrics of the codes against the data's factor labels (MIG, "
                   "beta-VAE, FactorVAE, DCI, SAP; dsprites): writes RUN/disentangle.json and a traversal PNG "
                   "with each code labelled by its factor", cmd_disentangle)
    g.add_argument("--points", type=checked(int, at_least=100), default=20_000, help="test points whose codes the metrics read")
    g.add_argument("--index", type=COUNT, default=0, help="the test point of the traversal figure")
    g.add_argument("--span", type=checked(float, above=0), default=3.0, help="traversal values from -span to span")
    g.add_argument("--steps", type=checked(int, at_least=2), default=9)


def _add_compare_command(sub) -> None:
    """compare: one run per estimator, side by side."""
    c = sub.add_parser("compare", help="train one model per ELBO estimator and compare them",
                       description=cmd_compare.__doc__ + " Writes OUT/compare.md, OUT/compare.csv, "
                       "OUT/figures/compare_bounds.png, OUT/figures/compare_snr.png and OUT/runs/.")
    c.add_argument("--estimators", nargs="+", required=True,
                   help="estimator specs, e.g. elbo meanfield iwae:K=5 iwae:K=50 dreg:K=50 stl")
    _add_train_flags(c)
    c.add_argument("--config", help="a TOML file of the same keys as the flags (flags win)")
    c.add_argument("--out", default="runs/compare", help="output folder")
    c.add_argument("--k", type=POSITIVE, default=1000, help="importance samples per test point for log p(x)")
    c.add_argument("--snr-repeats", type=checked(int, at_least=2), default=100, help="gradient draws per SNR estimate")
    c.add_argument("--snr-k", type=POSITIVE, nargs="+", default=[1, 5, 50], help="K values of the SNR figure")
    c.add_argument("--quiet", action="store_true")
    c.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier comparison in OUT/runs")
    c.set_defaults(func=cmd_compare)


def _add_demo_command(sub) -> None:
    """demo: the main job on MNIST, with pictures."""
    d = sub.add_parser("demo", help="train, evaluate and draw the iwae1 VAE on binarized MNIST",
                       description=cmd_demo.__doc__)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--epochs", type=POSITIVE, default=20)
    d.add_argument("--k", type=POSITIVE, default=1000)
    d.add_argument("--device", default="auto")
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--overwrite", action="store_true", help="replace the run already in --out (an earlier demo)")
    d.set_defaults(func=cmd_demo)


# errors of the machine rather than of the input or the code: one line, naming the file
ENVIRONMENT_ERRNOS = {"ENOSPC": "free some space, or write elsewhere", "EDQUOT": "free some space, or write elsewhere",
                      "EROFS": "give a writable folder", "EACCES": "give a folder you may write (or fix its permissions)",
                      "EPERM": "give a folder you may write (or fix its permissions)",
                      "ENOENT": "check the path", "ENOTDIR": "check the path", "EISDIR": "give a file, not a folder",
                      "EEXIST": "a file stands where a folder is needed: check the path"}


def _environment_error(e: OSError) -> str | None:
    """One line for an OSError of the machine (a full disk, a read-only folder, a missing
    file), or None for any other."""
    import errno

    name = errno.errorcode.get(e.errno or 0)
    if name not in ENVIRONMENT_ERRNOS or not e.filename:
        return None
    return f"{e.strerror}: {e.filename} ({ENVIRONMENT_ERRNOS[name]})"


def _report_bug(command: str) -> None:
    """After a traceback: whose bug it is, and where to report it."""
    import traceback

    frames = traceback.extract_tb(sys.exc_info()[2])
    package = str(Path(__file__).parent)
    user = [f for f in frames if not f.filename.startswith(package) and "site-packages" not in f.filename
            and "<frozen" not in f.filename and not f.filename.startswith(sys.prefix)]
    calls_user = frames and frames[-1].filename.endswith("programs.py") and frames[-1].name == "call"
    if user:
        print(f"pyro-vae {command}: the error above arose in your program ({user[-1].filename}, line "
              f"{user[-1].lineno}).", file=sys.stderr)
    elif calls_user:  # a user's program that is a built-in or C function: no frame of its own
        print(f"pyro-vae {command}: the error above arose in your program (the model or guide function "
              f"pyro-vae called).", file=sys.stderr)
    else:
        print(f"pyro-vae {command}: this is a bug in pyro-vae, not in your input: please report it with the "
              f"command and the traceback above.", file=sys.stderr)


def main(argv=None) -> int:
    """Run one command. A user's error (``errors.UserError``) or the machine's (a full disk, a
    read-only folder) prints one line and exits 2; Ctrl-C exits 130; anything else is a bug and
    keeps its traceback, with a line saying whose."""
    import traceback

    from pyro_vae.errors import UserError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except UserError as e:
        print(f"pyro-vae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        line = _environment_error(e)
        if line is None:
            raise
        print(f"pyro-vae {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        said = str(e) or ("interrupted" if args.command in ("compare", "demo") else
                          "interrupted: nothing was written (each file is written whole, at the end)")
        print(f"\n{said}", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        _report_bug(args.command)
        return 1


if __name__ == "__main__":
    sys.exit(main())
