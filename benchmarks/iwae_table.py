"""Burda et al. (2016), Table 1, beside our own: VAE and IWAE with k in {1, 5, 50}, one and two
stochastic layers, on binarized MNIST; test NLL by L_5000 and active units.

    python benchmarks/iwae_table.py --epochs 5                 # a CPU budget
    python benchmarks/iwae_table.py --paper-schedule           # 3,280 passes, for a GPU

The paper's schedule: stages i = 0..7 of 3^i epochs at learning rate 1e-3 * 10^(-i/7)
(Adam, batch size 20). The VAE with k samples trains on ``elbo:K=k`` (the average of k
ELBO estimates), the IWAE on ``iwae:K=k``; at k = 1 the two objectives coincide, so that
model is trained once and shown in both columns.

Each model lives in ``OUT/<layers>-<vae|iwae>-<k>``: a stopped table resumes every model from its
last checkpoint, a larger ``--epochs`` continues the same runs, and a model already evaluated
with the same setting is not trained again (its row is cached in ``table_row.json``). So the
layers can run as two processes side by side (``--layers 1`` and ``--layers 2``, same ``--out``)
and a last call with both assembles the table. Below the table come the paper's orderings as
yes/no checks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Burda et al. 2016, Table 1: test NLL (nats) by L_5000.
PAPER_NLL = {
    (1, "vae"): {1: 86.76, 5: 86.47, 50: 86.35},
    (1, "iwae"): {1: 86.76, 5: 85.54, 50: 84.78},
    (2, "vae"): {1: 85.33, 5: 85.01, 50: 84.78},
    (2, "iwae"): {1: 85.33, 5: 83.89, 50: 82.90},
}
PRESET = {1: "iwae1", 2: "iwae2"}


def paper_stages(epochs_budget: int | None):
    """(cumulative epochs, learning rate) per stage: the paper's 3^i schedule, or one stage."""
    if epochs_budget is not None:
        return [(epochs_budget, 1e-3)]
    total, stages = 0, []
    for i in range(8):
        total += 3**i
        stages.append((total, 1e-3 * 10 ** (-i / 7)))
    return stages


def train_one(run: Path, layers: int, spec: str, stages, args) -> float:
    """Train one model through ``stages``, resuming from its checkpoint; returns the training seconds."""
    from pyro_vae.config import TrainConfig
    from pyro_vae.run import CheckpointError, load_checkpoint, read_metrics
    from pyro_vae.training import train

    try:
        done = load_checkpoint(run)["epoch"]  # an interrupted table picks up where it stopped
    except CheckpointError:
        done = 0
    if done > stages[-1][0]:
        raise SystemExit(f"{run} already holds {done} epochs, more than the {stages[-1][0]} asked for; "
                         f"choose another --out (or delete that run).")
    for epochs, lr in stages:
        if done >= epochs:
            continue
        config = TrainConfig.from_dict(dict(
            preset=PRESET[layers], dataset="binarized-mnist", estimator=spec, epochs=epochs, lr=lr,
            batch_size=args.batch_size, seed=args.seed, device=args.device,
            train_size=args.train_size, test_size=args.test_size, amp=args.amp))
        train(config, run, resume=done > 0, quiet=True)
        done = epochs
    return sum(m["epoch_time_s"] for m in read_metrics(run))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, default=None, help="epochs per model at lr 1e-3 (default 5)")
    budget.add_argument("--paper-schedule", action="store_true", help="3^i epochs, i = 0..7 (3,280 passes)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 5, 50])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--columns", nargs="+", default=["vae", "iwae"], choices=["vae", "iwae"],
                   help="train only these columns (to spread models over processes); the table "
                        "is printed by a call with both")
    p.add_argument("--eval-k", type=int, default=5000, help="particles of the L_k test bound (paper: 5000)")
    p.add_argument("--iwae-estimator", default="iwae", help="estimator name for the IWAE column")
    p.add_argument("--vae-estimator", default="elbo", help="estimator name for the VAE column")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--max-memory", default="1GB")
    p.add_argument("--amp", default=None,
                   help="train with the weight layers' products in bfloat16 (pyro_vae/amp.py); "
                        "evaluation stays float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/iwae_table")
    args = p.parse_args(argv)

    from pyro_vae.amp import amp_dtype
    from pyro_vae.evaluation import evaluate_run
    from pyro_vae.objectives import make_estimator

    names = {"vae": args.vae_estimator, "iwae": args.iwae_estimator}
    for name in names.values():
        make_estimator(f"{name}:K=5")  # fail now, with the known names, not after hours
    try:
        amp_dtype(args.amp)  # likewise for --amp
    except ValueError as e:
        p.error(str(e))
    stages = paper_stages(None if args.paper_schedule else (args.epochs or 5))
    out = Path(args.out)
    results: dict[str, dict] = {}
    for layers in args.layers:
        for k in args.ks:
            for col in ("vae", "iwae"):
                if col not in args.columns:
                    continue
                key = f"{layers}-{col}-{k}"
                if k == 1 and col == "iwae":  # identical objective: the VAE run serves both columns
                    if f"{layers}-vae-1" in results:
                        results[key] = {**results[f"{layers}-vae-1"], "shared_with": f"{layers}-vae-1"}
                    continue
                run = out / key
                spec = f"{names[col]}:K={k}"
                row_file, setting = run / "table_row.json", _setting(args, stages)
                cached = json.loads(row_file.read_text()) if row_file.exists() else None
                if cached and cached["setting"] == setting:  # measured by an earlier call
                    results[key] = cached
                    continue
                print(f"training {key} ({spec}, {stages[-1][0]} epochs) ...", file=sys.stderr)
                train_s = train_one(run, layers, spec, stages, args)
                r = evaluate_run(run, k=args.eval_k, device=args.device, seed=args.seed,
                                 max_memory=args.max_memory, export_points=(), figures=False)
                results[key] = {"estimator": spec, "nll": r["test_nll"], "elbo": r["test_elbo"],
                                "active_units": r["active_units_per_site"], "train_s": train_s,
                                "eval_s": r["eval_time_s"], "setting": setting}
                row_file.write_text(json.dumps(results[key], indent=2))
                print(f"  NLL {r['test_nll']:.2f}  active units {r['active_units_per_site']}  "
                      f"({train_s:.0f} s + {r['eval_time_s']:.0f} s)", file=sys.stderr)
    if set(args.columns) != {"vae", "iwae"}:
        print(f"trained the {' and '.join(args.columns)} column; a call with both columns prints the table")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(format_table(results, args, stages))
    print(format_checks(results, args))
    return 0


def _setting(args, stages) -> dict:
    """What a cached row must share with this call to be reused."""
    return {"stages": [list(stage) for stage in stages], "batch_size": args.batch_size, "train_size": args.train_size,
            "test_size": args.test_size, "eval_k": args.eval_k, "seed": args.seed, "amp": args.amp}


def _au(r):
    return "+".join(str(v) for v in r["active_units"].values())


def format_table(results: dict, args, stages) -> str:
    head = (f"test NLL (nats) by L_{args.eval_k}; {stages[-1][0]} epochs, batch {args.batch_size}"
            + (f", trained with --amp {args.amp}" if args.amp else "")
            + (" (paper schedule)" if args.paper_schedule else "") + "; paper = Burda et al. 2016, Table 1")
    lines = [head, f"{'layers':>6} {'k':>3} | {'VAE':>7} {'paper':>6} {'AU':>6} | {'IWAE':>7} {'paper':>6} {'AU':>6}"]
    for layers in args.layers:
        for k in args.ks:
            v, w = results[f"{layers}-vae-{k}"], results[f"{layers}-iwae-{k}"]
            lines.append(f"{layers:>6} {k:>3} | {v['nll']:7.2f} {PAPER_NLL[(layers, 'vae')].get(k, float('nan')):6.2f} "
                         f"{_au(v):>6} | {w['nll']:7.2f} {PAPER_NLL[(layers, 'iwae')].get(k, float('nan')):6.2f} {_au(w):>6}")
    return "\n".join(lines)


def format_checks(results: dict, args) -> str:
    """The paper's orderings, each with yes/no: IWAE beats VAE at equal k > 1, two layers beat
    one, and IWAE keeps at least as many active units."""
    lines = []
    for layers in args.layers:
        for k in (k for k in args.ks if k > 1):
            v, w = results[f"{layers}-vae-{k}"], results[f"{layers}-iwae-{k}"]
            au_v, au_w = sum(v["active_units"].values()), sum(w["active_units"].values())
            lines.append(f"{layers} layer(s), k={k}: IWAE beats VAE by {v['nll'] - w['nll']:+.2f} nats "
                         f"[{'yes' if w['nll'] < v['nll'] else 'NO'}]; active units {au_w} vs {au_v} "
                         f"[{'yes' if au_w >= au_v else 'NO'}]")
    if set(args.layers) >= {1, 2}:
        for k in args.ks:
            for col in ("vae",) if k == 1 else ("vae", "iwae"):  # at k = 1 they are one model
                one, two = results[f"1-{col}-{k}"]["nll"], results[f"2-{col}-{k}"]["nll"]
                lines.append(f"{col.upper()} k={k}: two layers beat one by {one - two:+.2f} nats "
                             f"[{'yes' if two < one else 'NO'}]")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
