"""``--jit``: the training objective traced with ``torch.jit.trace`` and replayed.

Each Pyro step re-runs the model and guide through Pyro's effect handlers in Python; for the
small networks of a VAE that bookkeeping is a large share of the step. Tracing records the
tensor operations of one call (sampling included) once per input signature, and later calls
replay them without Python. The traced graph performs the same operations in the same order,
so it draws the same random numbers and returns the same values (checked when it is traced).

Like Pyro's own JIT ELBOs (``JitTrace_ELBO``), it assumes the programs' control flow does not
depend on tensor values, and that the estimator changes gradients by tensor operations (such as
DReG's ``ScaleGrad``), not by gradient hooks, which a trace does not record. KL weights (beta) enter as tensors, so schedules keep working.

The trace is replayed with TorchScript's graph optimizations off
(``torch.jit.optimized_execution(False)``): the same kernels as eager, gradients by ordinary
autograd. With them on, the profiling executor's fusions and symbolic gradients made CUDA
steps 1.8x (batch 1024) to 3.7x (batch 4096) slower than eager on an H200; off, the trace is
1.05-1.13x hand-written PyTorch at batch 128 to 4096 and no slower on the CPU
(``benchmarks/results/cuda-h200.md``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from pyro_vae.errors import ConfigError, ProgramError
from pyro_vae.objectives.base import Objective


class _Call(nn.Module):
    def __init__(self, objective: Objective, weight_keys, context_keys):
        super().__init__()
        self.objective, self.weight_keys, self.context_keys = objective, weight_keys, context_keys

    def forward(self, x, *args):
        n = len(self.weight_keys)
        kwargs = dict(zip(self.weight_keys, args[:n])) | dict(zip(self.context_keys, args[n:]))
        return self.objective(x, **kwargs)


class TracedObjective(nn.Module):
    """Wraps an ``Objective``; training calls (with gradients) run a cached trace, others eager."""

    def __init__(self, objective: Objective):
        super().__init__()
        if type(objective) is not Objective:
            raise ConfigError(f"--jit traces the plain Objective (beta schedules, any estimator); "
                             f"{type(objective).__name__} (capacity or free bits) runs without --jit")
        self.objective = objective
        self._traces: dict = {}
        self._weights: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self.objective(x, **kwargs)
        weights = {k: v for k, v in kwargs.items() if not torch.is_tensor(v)}
        context = {k: v for k, v in kwargs.items() if torch.is_tensor(v)}
        wkeys, ckeys = tuple(sorted(weights)), tuple(sorted(context))
        args = [self._scalar(k, weights[k], x) for k in wkeys] + [context[k] for k in ckeys]
        key = (tuple(x.shape), x.dtype, x.device, wkeys, ckeys, tuple(a.shape for a in args))
        traced = self._traces.get(key)
        if traced is None:
            traced = self._traces[key] = self._trace(x, args, wkeys, ckeys)
        with torch.jit.optimized_execution(False):
            return traced(x, *args)

    def _scalar(self, key: str, value: float, like: torch.Tensor) -> torch.Tensor:
        """A device scalar reused across steps: ``fill_`` sets it without a host round trip."""
        t = self._weights.get(key)
        if t is None or t.device != like.device:
            t = self._weights[key] = torch.zeros((), dtype=like.dtype, device=like.device)
        return t.fill_(value)

    def _trace(self, x, args, wkeys, ckeys):
        call = _Call(self.objective, wkeys, ckeys)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(call, (x, *args), check_trace=False)
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            eager = call(x, *args)
        with torch.no_grad(), torch.random.fork_rng(devices=devices), torch.jit.optimized_execution(False):
            replay = traced(x, *args)
        if not torch.allclose(eager, replay, rtol=1e-4, atol=1e-4):
            raise ProgramError(
                f"--jit: the traced objective gives {float(replay):.4f} where the model and guide "
                f"give {float(eager):.4f}; their control flow must depend on tensor values. "
                f"Train without --jit."
            )
        return traced
