"""Seconds per training epoch: pyro-vae against hand-written PyTorch, same model/data/batch, one process.

For each preset and estimator, toolkit and reference epochs are interleaved (toolkit, reference,
toolkit, ...) so that both see the same machine load; the table gives the median seconds per
epoch of each and their ratio (toolkit / reference; goal <= 1.05 at K=1, <= 1.10 at K=50).

    python benchmarks/overhead.py                       # seed and iwae1; elbo, meanfield, iwae:K=50
    python benchmarks/overhead.py --device cuda --batch-size 128 512 4096    # a batch-size sweep
    python benchmarks/overhead.py --device cuda --amp bf16                    # both sides in bf16

With ``--amp bf16`` both sides run their weight layers under the same autocast
(``pyro_vae.amp.autocast_layers``), so the ratio still compares like with like.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference_torch import TorchVAE, make_loss  # noqa: E402
from reference_torch import train_epoch as reference_epoch  # noqa: E402

from pyro_vae.amp import amp_dtype, autocast_layers  # noqa: E402
from pyro_vae.config import PRESETS, TrainConfig, build_model_and_guide  # noqa: E402
from pyro_vae.data import load_dataset  # noqa: E402
from pyro_vae.objectives import ESTIMATORS, Objective, make_estimator, parse_spec  # noqa: E402
from pyro_vae.objectives.traced import trace_objective  # noqa: E402
from pyro_vae.schedules import KLSchedule  # noqa: E402
from pyro_vae.training import resolve_device, train_epoch  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()
            or platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def measure(data, preset: str, spec: str, batch_size: int, epochs: int, device, mode="default", lr=1e-3,
            seed=0, amp=None) -> dict:
    """``mode``: ``default`` (what ``pyro-vae train`` does: traced where the program allows it) or
    ``eager`` (``--no-jit``)."""
    name, opts = parse_spec(spec)
    k = int(opts.get("K", 1))
    config = TrainConfig.from_dict(dict(preset=preset, estimator=spec, x_dim=data.x_dim))
    torch.manual_seed(seed)
    model, guide = build_model_and_guide(config, data.train_mean())
    model, guide = model.to(device), guide.to(device)
    p = PRESETS[preset]
    vae = TorchVAE(data.x_dim, p["z_dim"], p["hidden"], p["activation"],
                   data.train_mean() if p["init_output_bias"] else None).to(device)
    if amp:
        for module in (model, guide, vae):
            autocast_layers(module, device.type, amp_dtype(amp))
    objective = trace_objective(Objective(model, guide, make_estimator(spec)), None if mode == "default" else False)
    optimizer = torch.optim.Adam(objective.parameters(), lr=lr)
    schedule = KLSchedule()
    ref_optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    ref_loss = make_loss(name, k)

    tk, ref = [], []
    for epoch in range(epochs + 1):  # epoch 0 warms up both
        t_tk = timed(lambda e=epoch: train_epoch(objective, optimizer, data, batch_size, schedule, e + 1), device)
        t_ref = timed(lambda: reference_epoch(vae, ref_optimizer, data, batch_size, ref_loss), device)
        if epoch:
            tk.append(t_tk), ref.append(t_ref)
    a, b = statistics.median(tk), statistics.median(ref)
    return {"preset": preset, "estimator": spec, "mode": mode, "jit": getattr(objective, "traced", False), "amp": amp, "batch_size": batch_size,
            "toolkit_s": a, "reference_s": b, "ratio": a / b, "samples_per_s": len(data.train) / a,
            "epochs_timed": epochs}


def _row(r: dict) -> str:
    mode = {"default": "default (traced)" if r["jit"] else "default (eager)", "eager": "eager (--no-jit)"}[r["mode"]]
    mode += f" {r['amp']}" if r.get("amp") else ""
    return (f"| {r['preset']} | {r['estimator']} | {mode} | {r['batch_size']} | "
            f"{r['toolkit_s']:.3f} | {r['reference_s']:.3f} | {r['ratio']:.3f} | {r['samples_per_s']:,.0f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["seed", "iwae1"])
    p.add_argument("--estimators", nargs="+", default=["elbo", "meanfield", "iwae:K=50"])
    p.add_argument("--batch-size", type=int, nargs="+", default=[100], help="one or more (a sweep)")
    p.add_argument("--modes", nargs="+", default=["default", "eager"], choices=["default", "eager"],
                   help="the toolkit as `pyro-vae train` runs it (traced where it can be), and with --no-jit")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per side (after one warm-up)")
    p.add_argument("--train-size", type=int, default=None, help="default: all 60,000 images")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["bf16"], default=None, help="weight layers of both sides in bfloat16")
    p.add_argument("--out", default="benchmarks/results", help="folder for TAG.json / TAG.md")
    p.add_argument("--tag", default=None, help="file name stem (default: overhead-DEVICE[-AMP])")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    data = load_dataset("binarized-mnist", device, train_size=args.train_size, test_size=1)
    rows = []
    header = ["| preset | estimator | mode | batch | pyro-vae s/epoch | PyTorch s/epoch | ratio | pyro-vae samples/s |",
              "|---|---|---|---|---|---|---|---|"]
    print("\n".join(header))
    for preset in args.presets:
        for spec in args.estimators:
            if parse_spec(spec)[0] not in ESTIMATORS:
                print(f"| {preset} | {spec} | skipped: estimator not available |", file=sys.stderr)
                continue
            for batch_size in args.batch_size:
                for mode in args.modes:
                    r = measure(data, preset, spec, batch_size, args.epochs, device, mode=mode,
                                amp=args.amp)
                    rows.append(r)
                    print(_row(r), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"overhead-{device.type}" + (f"-{args.amp}" if args.amp else "")
    result = {"machine": machine(), "device": str(device), "train_size": len(data.train), "rows": rows}
    (out / f"{tag}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# {tag}", "", f"command: python {' '.join(sys.argv)}", "",
             f"machine: {json.dumps(result['machine'])}, training images: {len(data.train)}", "", *header]
    lines += [_row(r) for r in rows]
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
