"""KL-weight schedules: beta (or the capacity C) as a function of training progress t, in epochs.

One ``KLSchedule`` decides the KL weighting each step; the training loop calls
``schedule.weights(t)`` and hands the result to the objective (and to ``metrics.jsonl``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pyro_vae.errors import ConfigError


@dataclass(frozen=True)
class KLSchedule:
    """The weight of KL(q || p) in the objective at training progress t (epochs).

    - constant beta (Higgins et al. 2017): ``beta``, everything else off;
    - linear warm-up (Bowman et al. 2016): beta(t) = beta * min(1, t / warmup_epochs);
    - cyclical annealing (Fu et al. 2019): with cycle length ``cycle_epochs`` and ratio R =
      ``cycle_ratio``, tau in (0, 1] the position in the current cycle, and
      beta(t) = beta * min(1, tau / R);
    - capacity annealing (Burgess et al. 2018): the loss term gamma * |KL - C(t)| with
      C(t) = capacity * min(1, t / capacity_epochs) (reached at once when capacity_epochs is 0);
    - free bits (Kingma et al. 2016): each latent dimension's KL enters as max(free_bits, KL_j).

    beta and its warm-up/cycles scale the latent sites (``ScaleLatents``) and work with every
    estimator; capacity and free bits need the KL itself, see ``objectives.kl_penalty``.
    """

    beta: float = 1.0
    warmup_epochs: float = 0
    cycle_epochs: float = 0
    cycle_ratio: float = 0.5
    capacity: float | None = None
    capacity_epochs: float = 0
    gamma: float = 1000.0
    free_bits: float = 0.0

    def __post_init__(self):
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if self.warmup_epochs and self.cycle_epochs:
            raise ConfigError("choose one of warmup_epochs (linear warm-up) and cycle_epochs "
                             "(cyclical annealing), not both")
        if not 0 < self.cycle_ratio <= 1:
            raise ConfigError(f"cycle_ratio must lie in (0, 1], got {self.cycle_ratio}")
        if self.capacity is not None and (self.capacity < 0 or self.gamma <= 0):
            raise ConfigError(f"capacity needs capacity >= 0 and gamma > 0, got {self.capacity}, {self.gamma}")
        if self.free_bits < 0:
            raise ConfigError(f"free_bits is a KL floor in nats per dimension, >= 0; got {self.free_bits}")
        if self.capacity is not None and self.free_bits:
            raise ConfigError("capacity annealing and free bits are two different KL penalties; choose one")

    @classmethod
    def from_config(cls, config) -> KLSchedule:
        return cls(**{k: getattr(config, k) for k in cls.__dataclass_fields__})

    @property
    def needs_kl(self) -> bool:
        """True where the objective must compute the KL itself (capacity or free bits)."""
        return self.capacity is not None or self.free_bits > 0

    def __call__(self, t: float) -> float:
        """beta(t)."""
        if self.cycle_epochs > 0:
            # position in the current cycle, in (0, 1]: a cycle's last step has tau = 1
            tau = 0.0 if t <= 0 else t / self.cycle_epochs - math.ceil(t / self.cycle_epochs) + 1
            return self.beta * min(1.0, tau / self.cycle_ratio)
        if self.warmup_epochs > 0:
            return self.beta * min(1.0, t / self.warmup_epochs)
        return self.beta

    def capacity_at(self, t: float) -> float:
        """C(t), rising linearly from 0 to ``capacity`` over ``capacity_epochs``."""
        if self.capacity is None:
            raise ValueError("this schedule has no capacity; set capacity (nats) to anneal it")
        if self.capacity_epochs <= 0:
            return float(self.capacity)
        return self.capacity * min(1.0, t / self.capacity_epochs)

    def weights(self, t: float) -> dict:
        """Keyword arguments for the objective at progress t (also written to metrics.jsonl):
        {"capacity": C}, or {"beta": b} with "free_bits" where set."""
        if self.capacity is not None:
            return {"capacity": self.capacity_at(t)}
        return {"beta": self(t), **({"free_bits": self.free_bits} if self.free_bits else {})}
