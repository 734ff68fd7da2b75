"""Disentanglement on procedural dSprites: a VAE (beta = 1), beta-VAE (beta = 4, 16) and
beta-TCVAE (beta = 6), a few seeds each, measured by `pyro-vae disentangle`'s metrics; prints a
markdown table of mean and spread over seeds, with the papers' orderings as yes/no checks.

    python examples/disentanglement.py                     # MLP 512-512, 300,000 images at 64x64, 2 epochs of
                                                           # batch 64 (9,376 steps); 3 seeds: ~2 hours on one thread
    python examples/disentanglement.py --seeds 0 --epochs 1 --train-size 20000   # a quick look
    python examples/disentanglement.py --net conv4 --hidden 256 --runs runs/disentanglement-conv4
                                                           # disentanglement_lib's conv net, same steps: ~4 hours
    python examples/disentanglement.py --image-size 32 --epochs 4 --runs runs/disentanglement-32
                                                           # the 32x32 budget (where the ordering does not show)
    python examples/disentanglement.py --runs runs/disentanglement --out table.md

Runs go seed by seed (every objective of seed 0, then of seed 1, ...), so that an interrupted
matrix leaves whole seeds. 
Each run lands in RUNS/NAME-sSEED (a run already there with the same settings is measured, not
trained again, or continued with --resume semantics where it has fewer epochs; its RUN/disentangle.json is reused when it is newer than the checkpoint and read
as many points, i.e. `pyro-vae disentangle RUN --points N` gives the same), with
RUN/figures/disentangle_traversals.png.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from pyro_vae.applications import disentangle_run
from pyro_vae.config import TrainConfig
from pyro_vae.run import holds_run, load_config, read_metrics
from pyro_vae.training import train

OBJECTIVES = {  # name: (label, settings)
    "vae": ("VAE (beta = 1)", {"beta": 1.0}),
    "beta4": ("beta-VAE (beta = 4)", {"beta": 4.0}),
    "beta16": ("beta-VAE (beta = 16)", {"beta": 16.0}),
    "tcvae6": ("beta-TCVAE (beta = 6)", {"estimator": "beta-tcvae:beta=6"}),
}
METRICS = ("mig", "mig_without_shape", "factor_vae_score", "beta_vae_score", "dci_disentanglement", "sap",
           "total_correlation", "reconstruction", "active_codes")
MEASURED = tuple(m for m in METRICS if m != "mig_without_shape")  # the others are read from RUN/disentangle.json

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--runs", default="runs/disentanglement", help="folder of the runs")
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
p.add_argument("--train-size", type=int, default=300_000)
p.add_argument("--image-size", type=int, default=64, help="dSprites' 64x64 images averaged down to this size")
p.add_argument("--net", default="mlp", choices=("mlp", "conv", "conv4"))
p.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--points", type=int, default=20_000, help="test images the metrics read")
p.add_argument("--out", help="also write the table to this markdown file")
args = p.parse_args()

results, wall = {}, {}
KEYS = ("dataset", "image_size", "train_size", "test_size", "net", "z_dim", "hidden", "batch_size", "lr", "seed",
        "estimator", "beta")
for seed in args.seeds:
    for name in args.objectives:
        settings = OBJECTIVES[name][1]
        run = Path(args.runs) / f"{name}-s{seed}"
        config = TrainConfig.from_dict({
            "dataset": "dsprites", "image_size": args.image_size, "train_size": args.train_size, "test_size": 2000,
            "net": args.net, "z_dim": 10, "hidden": args.hidden, "batch_size": args.batch_size, "lr": args.lr,
            "epochs": args.epochs, "seed": seed, "device": "cpu", **settings})
        epochs_done = read_metrics(run)[-1]["epoch"] if holds_run(run) and read_metrics(run) else 0
        if epochs_done and any(getattr(load_config(run), k) != getattr(config, k) for k in KEYS):
            raise SystemExit(f"{run} holds a run with other settings: choose another --runs folder")
        if epochs_done < args.epochs:
            print(f"training {run} ({'from epoch ' + str(epochs_done) if epochs_done else 'afresh'}) ...", flush=True)
            if epochs_done:
                saved = load_config(run).to_dict()
                train(TrainConfig.from_dict({**saved, "epochs": args.epochs}), run, resume=True, quiet=True)
            else:
                train(config, run, quiet=True, overwrite=holds_run(run))
        wall.setdefault(name, []).append(sum(m["epoch_time_s"] for m in read_metrics(run)[: args.epochs]))
        measured = run / "disentangle.json"  # reused when it measured this checkpoint with these settings
        if measured.exists() and measured.stat().st_mtime > (run / "checkpoint.pt").stat().st_mtime \
                and json.loads(measured.read_text())["points"] == args.points \
                and all(m in json.loads(measured.read_text()) for m in MEASURED):
            r = json.loads(measured.read_text())
        else:
            r = disentangle_run(run, points=args.points, seed=0, device="cpu")
        # MIG over the factors Chen et al.'s own code scores on dSprites (scale, orientation, pos_x, pos_y:
        # metric_helpers/mi_metric.py of their repository leaves shape out), same estimator otherwise
        r["mig_without_shape"] = float(np.mean([g for f, g in zip(r["factor_names"], r["mig_per_factor"]) if f != "shape"]))
        results.setdefault(name, []).append(r)
        print(f"{run}: " + "  ".join(f"{m} {r[m]:.3f}" for m in METRICS), flush=True)


def cell(name, metric):
    values = np.array([r[metric] for r in results[name]])
    spread = f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else ""
    if metric == "active_codes":
        return f"{values.mean():.1f}{spread}"
    return f"{values.mean():.2f}{spread}" if metric in ("reconstruction", "total_correlation") else f"{values.mean():.3f}{spread}"


def mean(name, metric):
    return float(np.mean([r[metric] for r in results[name]]))


lines = ["| objective | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
lines += [f"| {OBJECTIVES[n][0]} | " + " | ".join(cell(n, m) for m in METRICS) + " |" for n in results]
steps = args.epochs * -(-args.train_size // args.batch_size)
checks = {}
if {"vae", "beta4", "beta16", "tcvae6"} <= set(results):
    for m, label in (("mig", "MIG"), ("mig_without_shape", "MIG without shape")):
        checks[f"beta-TCVAE >= beta-VAE (best beta) on {label}"] = \
            mean("tcvae6", m) >= max(mean("beta4", m), mean("beta16", m))
        checks[f"beta-VAE (beta = 4) > VAE on {label}"] = mean("beta4", m) > mean("vae", m)
        checks[f"beta-TCVAE > VAE on {label}"] = mean("tcvae6", m) > mean("vae", m)
lines += ["", f"mean ± sd over seeds {args.seeds}; reconstruction = -E_q log p(x|z), nats per image "
          f"({args.image_size}x{args.image_size}); total_correlation in nats; {args.train_size} training images, {args.epochs} epochs "
          f"of batch {args.batch_size} ({steps} steps), net {args.net} {args.hidden}; training time per run (s): "
          + ", ".join(f"{n} {min(w):.0f}-{max(w):.0f}" for n, w in wall.items()), ""]
lines += [f"- {claim}: {'yes' if held else 'NO'}" for claim, held in checks.items()]
table = "\n".join(lines)
print(table)
if args.out:
    Path(args.out).write_text(table + "\n")
    (Path(args.out).with_suffix(".json")).write_text(json.dumps(
        {n: [{m: r[m] for m in (*METRICS, "mig_per_factor", "dci_completeness", "dci_informativeness_test",
                                 "captured_factor")}
             for r in rs] for n, rs in results.items()} | {"training_time_s": wall}, indent=2))
