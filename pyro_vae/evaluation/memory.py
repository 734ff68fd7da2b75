"""Memory: parse a bound such as '2GB', measure the peak of a probe, and plan chunk sizes."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import warnings

import torch

from pyro_vae.errors import ConfigError
from pyro_vae.evaluation.noise import PARTICLE_BLOCK

# On a CPU, chunks of a few thousand pairs keep the decoder's (particles, points, D) tensors in
# cache: measured 1.8x less CPU time than 50,000-pair chunks for the iwae1 model at k=5000.
CPU_CHUNK_PAIRS = 4096


def parse_bytes(text) -> int:
    """'2GB', '512MB', '1.5G', '100000' (bytes) -> a positive number of bytes."""
    size = _parse_bytes(text)
    if not size > 0:
        raise ConfigError(f"--max-memory {text}: the memory bound must be positive, e.g. 2GB or 512MB")
    return size


def _parse_bytes(text) -> int:
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().upper().replace("IB", "B")
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "K": 2**10, "M": 2**20,
             "G": 2**30, "T": 2**40, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise ConfigError(f"--max-memory {text}: cannot read a memory size; write e.g. 2GB, 512MB or a number "
                          f"of bytes") from None


def peak_memory_bytes(fn, device) -> tuple[object, int]:
    """Run ``fn()``; return (its result, peak bytes allocated by torch while it ran).

    CUDA: ``torch.cuda.max_memory_allocated``; CPU: the running sum of the allocation events
    and frees the torch profiler records (``profile_memory=True``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), _native_stderr_silenced():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        # allocations are the ops' self memory, frees are "[memory]" events with negative sizes
        events = sorted(prof.events(), key=lambda e: e.time_range.start)
    running = itertools.accumulate((e.self_cpu_memory_usage for e in events), initial=0)
    return out, max(running)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send file descriptor 2 to /dev/null for a moment: the profiler's C++ side (kineto) logs
    "profiler_start" lines, and on a CUDA build without a GPU an "ERROR ... gpuGetDeviceCount
    failed" line, that mean nothing to someone evaluating on a CPU."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def plan_chunks(k: int, n: int, pairs: int) -> tuple[int, int]:
    """(data points, particles) per chunk with at most ``pairs`` (point, particle) pairs in flight
    (at least one noise block). Particle chunks are whole multiples of ``PARTICLE_BLOCK``, of
    near-equal size."""
    if k <= pairs:
        return max(1, min(n, pairs // k)), k
    widest = max(PARTICLE_BLOCK, pairs // PARTICLE_BLOCK * PARTICLE_BLOCK)
    parts = math.ceil(k / widest)
    return 1, math.ceil(k / parts / PARTICLE_BLOCK) * PARTICLE_BLOCK

