"""KL-weight schedules: beta as a function of training progress t, measured in epochs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KLSchedule:
    """beta(t) = beta * min(1, t / warmup_epochs): constant (Higgins et al. 2017) when
    ``warmup_epochs`` is 0, else a linear warm-up from 0 (Bowman et al. 2016)."""

    beta: float = 1.0
    warmup_epochs: float = 0

    def __call__(self, t: float) -> float:
        if self.warmup_epochs <= 0:
            return self.beta
        return self.beta * min(1.0, t / self.warmup_epochs)
