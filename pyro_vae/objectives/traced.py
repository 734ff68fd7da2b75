"""The training objective traced with ``torch.jit.trace`` and replayed: the default.

Each Pyro step re-runs the model and guide through Pyro's effect handlers in Python; for the
small networks of a VAE that bookkeeping is a large share of the step. Tracing records the
tensor operations of one call (sampling included) once per input signature, and later calls
replay them without Python. The traced graph performs the same operations in the same order,
so it draws the same random numbers and returns the same values (checked when it is traced).

Like Pyro's own JIT ELBOs (``JitTrace_ELBO``), it assumes the programs' control flow does not
depend on tensor values, and that the estimator changes gradients by tensor operations (such as
DReG's ``ScaleGrad``), not by gradient hooks, which a trace does not record. KL weights (beta)
enter as tensors, so schedules keep working.

``jit`` setting: ``None`` (the default) traces where the programs allow it and otherwise trains
eagerly, saying why in one line; ``True`` (``--jit``) traces or refuses; ``False``
(``--no-jit``) is always eager. A program cannot be traced when it says so with a reason in a
``not_traceable`` attribute (the VQ-VAE's guide, whose codebook updates in a Python hook; M2,
which splits batches by label values), when the objective is not the plain
``Objective`` (capacity, free bits), when tracing fails or replays a different value, or when a
user's own code turns a tensor into a Python value while being traced (a ``TracerWarning`` from
a file outside torch, Pyro and pyro-vae): the trace would freeze that value, as Pyro's
``JitTrace_ELBO`` would.

The trace is replayed with TorchScript's graph optimizations off
(``torch.jit.optimized_execution(False)``): the same kernels as eager, gradients by ordinary
autograd. With them on, the profiling executor's fusions and symbolic gradients made CUDA
steps 1.8x (batch 1024) to 3.7x (batch 4096) slower than eager on an H200; off, the trace is
1.05-1.13x hand-written PyTorch at batch 128 to 4096 and no slower on the CPU
(``benchmarks/results/cuda-h200.md``).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from torch import nn

from pyro_vae.errors import ConfigError, ProgramError
from pyro_vae.objectives.base import Objective

_LIBRARIES = tuple(str(Path(m.__file__).resolve().parent) for m in (torch, pyro))
_OURS = str(Path(__file__).resolve().parents[1])


def say_on_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def untraceable_reason(objective) -> str | None:
    """Why ``objective`` cannot be traced before it runs, or None."""
    if type(objective) is not Objective:
        return f"{type(objective).__name__} (capacity or free bits) is not the plain objective that a trace replays"
    for kind in ("model", "guide"):  # a program says why it cannot be traced (the VQ-VAE's codebook, M2's split)
        owner = _declaring(getattr(objective, kind))
        if owner is not None:
            return f"{kind} {type(owner).__name__}: {owner.not_traceable}"
    return None


def _declaring(program):
    """The object with a ``not_traceable`` reason among a program, the function or method a
    ``Program`` wraps, and that method's instance; or None."""
    inner = getattr(program, "program", None)
    for candidate in (program, inner, getattr(inner, "__self__", None)):
        if candidate is not None and getattr(candidate, "not_traceable", None):
            return candidate
    return None


def trace_objective(objective, jit: bool | None, say: Callable[[str], None] = say_on_stderr):
    """The objective to train with under the ``jit`` setting: a ``TracedObjective`` where it may be
    traced, else ``objective`` itself (``jit=None`` says why; ``jit=True`` refuses)."""
    if jit is False:
        return objective
    reason = untraceable_reason(objective)
    if reason is None:
        return TracedObjective(objective, required=bool(jit), say=say)
    if jit:
        raise ConfigError(f"--jit: {reason}: drop --jit")
    say(f"eager steps: {reason} (--no-jit: eager without this note)")
    return objective


class _Call(nn.Module):
    def __init__(self, objective: Objective, weight_keys, context_keys):
        super().__init__()
        self.objective, self.weight_keys, self.context_keys = objective, weight_keys, context_keys

    def forward(self, x, *args):
        n = len(self.weight_keys)
        kwargs = dict(zip(self.weight_keys, args[:n])) | dict(zip(self.context_keys, args[n:]))
        return self.objective(x, **kwargs)


class _Untraceable(Exception):
    """The trace cannot stand in for the eager call (the message says why)."""


class TracedObjective(nn.Module):
    """Wraps an ``Objective``; training calls (with gradients) run a cached trace, others eager.

    ``required=False``: where tracing or a check of the replay fails (see the module's docstring), say why once
    through ``say`` and run eagerly from then on; ``required=True``: raise ``ProgramError``."""

    def __init__(self, objective: Objective, required: bool = True, say: Callable[[str], None] = say_on_stderr):
        super().__init__()
        reason = untraceable_reason(objective)
        if reason is not None:
            raise ConfigError(f"--jit: {reason}: drop --jit")
        self.objective, self.required, self.say = objective, required, say
        self.eager_reason: str | None = None
        self._traces: dict = {}
        self._checked_twice: set = set()
        self._weights: dict[str, torch.Tensor] = {}

    @property
    def traced(self) -> bool:
        """Whether training steps replay a trace (False once it fell back to eager)."""
        return self.eager_reason is None

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()) or self.eager_reason is not None:
            return self.objective(x, **kwargs)
        weights = {k: v for k, v in kwargs.items() if not torch.is_tensor(v)}
        context = {k: v for k, v in kwargs.items() if torch.is_tensor(v)}
        wkeys, ckeys = tuple(sorted(weights)), tuple(sorted(context))
        args = [self._scalar(k, weights[k], x) for k in wkeys] + [context[k] for k in ckeys]
        key = (tuple(x.shape), x.dtype, x.device, wkeys, ckeys, tuple(a.shape for a in args))
        try:
            traced = self._traces.get(key)
            if traced is None:  # a new input signature: trace it, and check the replay on this batch
                traced = self._traces[key] = self._trace(x, args, wkeys, ckeys)
            elif key not in self._checked_twice:  # and on the next batch: values the trace froze show here
                self._checked_twice.add(key)
                self._check_replay(traced, _Call(self.objective, wkeys, ckeys), x, args)
        except _Untraceable as e:
            if self.required:
                raise ProgramError(f"--jit: {e}; train without --jit") from None
            self.eager_reason = str(e)
            self.say(f"eager steps: {e} (--no-jit: eager without this note)")
            return self.objective(x, **kwargs)
        with torch.jit.optimized_execution(False):
            return traced(x, *args)

    def _scalar(self, key: str, value: float, like: torch.Tensor) -> torch.Tensor:
        """A device scalar reused across steps: ``fill_`` sets it without a host round trip."""
        t = self._weights.get(key)
        if t is None or t.device != like.device:
            t = self._weights[key] = torch.zeros((), dtype=like.dtype, device=like.device)
        return t.fill_(value)

    def _trace(self, x, args, wkeys, ckeys):
        """Trace one call and check that the replay gives the eager value (``_Untraceable`` if not)."""
        call = _Call(self.objective, wkeys, ckeys)
        devices = [x.device] if x.device.type == "cuda" else []
        with _buffers_kept(call), torch.random.fork_rng(devices=devices), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            try:
                traced = torch.jit.trace(call, (x, *args), check_trace=False)
            except Exception as e:  # noqa: BLE001 - whatever stops the tracer, eager steps still work
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise _Untraceable(f"tracing the objective failed ({type(e).__name__}: {first})") from e
        frozen = _user_tracer_warning(caught)
        if frozen:
            raise _Untraceable(f"the program turns a tensor into a Python value at {frozen}, which a trace "
                               f"would freeze")
        self._check_replay(traced, call, x, args)
        return traced

    @staticmethod
    def _check_replay(traced, call, x, args) -> None:
        """The replay gives the eager value on this batch, from the same random numbers; the
        buffers these extra calls update (batch-norm statistics) are put back as they were."""
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            with _buffers_kept(call), torch.no_grad():
                with torch.random.fork_rng(devices=devices):  # both from the same random numbers
                    eager = call(x, *args)
                with torch.random.fork_rng(devices=devices), torch.jit.optimized_execution(False):
                    replay = traced(x, *args)
        except RuntimeError as e:  # e.g. a size the trace froze
            first = (str(e).strip().splitlines() or ["RuntimeError"])[0]
            raise _Untraceable(f"the traced objective fails on replay ({first})") from e
        if not torch.allclose(eager, replay, rtol=1e-4, atol=1e-4):
            raise _Untraceable(f"the traced objective gives {float(replay):.4f} where the model and guide give "
                               f"{float(eager):.4f} (control flow that depends on tensor values)")


@contextlib.contextmanager
def _buffers_kept(module: nn.Module):
    """Put the module's buffers (batch-norm statistics) back as they were: the calls that trace
    and check must not count as training steps."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


# a tensor's length or rows (``pyro.plate("data", len(x))``): sizes, which the traces are keyed by;
# a size that depends on values (``len(x[mask])``) shows when the second batch is checked
_SHAPE_ONLY = ("Using len to get tensor shape", "Iterating over a tensor")


def _user_tracer_warning(caught) -> str | None:
    """'file:line' of the first TracerWarning raised from code outside torch, Pyro and pyro-vae
    about a tensor's value turned into a Python value (not its size)."""
    for w in caught:
        if not issubclass(w.category, torch.jit.TracerWarning) or str(w.message).startswith(_SHAPE_ONLY):
            continue
        path = str(Path(w.filename).resolve())
        if not path.startswith((*_LIBRARIES, _OURS)):
            return f"{w.filename}:{w.lineno}"
    return None
