"""Per-step time of one objective three ways: eager, ``--jit`` (torch.jit.trace) and torch.compile.

iwae1 architecture, ``elbo``, batch 100, one thread; medians of 3 rounds of 100 steps.

    python benchmarks/jit_vs_compile.py
    python benchmarks/jit_vs_compile.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyro_vae.config import TrainConfig, build_model_and_guide  # noqa: E402
from pyro_vae.objectives import Objective, make_estimator  # noqa: E402
from pyro_vae.objectives.traced import TracedObjective  # noqa: E402


def stepper(objective, params, x):
    optimizer = torch.optim.Adam(params)

    def step():
        loss = objective(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def ms_per_step(step, device, n=100) -> float:
    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    device = torch.device(p.parse_args(argv).device)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    model, guide = build_model_and_guide(TrainConfig.from_dict(dict(preset="iwae1", x_dim=784)))
    objective = Objective(model.to(device), guide.to(device), make_estimator("elbo"))
    x = torch.bernoulli(torch.rand(100, 784, device=device) * 0.3)
    steps = {"eager": stepper(objective, objective.parameters(), x),
             "jit": stepper(TracedObjective(objective), objective.parameters(), x)}
    t0 = time.time()
    compiled = stepper(torch.compile(objective), objective.parameters(), x)
    compiled()
    print(f"torch.compile: first step {time.time() - t0:.1f} s")
    steps["compile"] = compiled
    times = {k: [] for k in steps}
    for _ in range(3):
        for k, step in steps.items():
            times[k].append(ms_per_step(step, device))
    for k, v in times.items():
        print(f"{k:8s} {statistics.median(v):.2f} ms/step")


if __name__ == "__main__":
    main()
