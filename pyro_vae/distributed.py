"""Many processes through ``torch.distributed`` (launched by ``torchrun``): who am I, and reductions.

``torchrun --nproc-per-node N -m pyro_vae train ...`` (or ``pyro-vae train --nproc N``) starts
N processes with RANK, WORLD_SIZE and LOCAL_RANK set; each trains on its shard of every global
batch, ``DistributedDataParallel`` averages the gradients, and rank 0 alone writes the run
directory. Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pyro_vae.errors import ConfigError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (CUDA where torch sees a GPU, else the CPU) or the named device, checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for CUDA, but torch sees no GPU; use --device cpu")
    return dev


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device: torch.device) -> World:
        """Join the process group torchrun describes in the environment (a world of 1 without it)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each process on a GPU of its own (cuda:LOCAL_RANK) when training on CUDA."""
        if self.size > 1 and device.type == "cuda" and device.index is None:
            gpus = torch.cuda.device_count()
            if self.local_rank >= gpus:
                raise ConfigError(
                    f"process {self.local_rank} of this machine has no GPU of its own: it has {gpus}, "
                    f"and nccl needs one per process. Start at most {gpus} per machine "
                    f"(--nproc {gpus}, or torchrun --nproc-per-node {gpus}), or train on the CPU (--device cpu)."
                )
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch."""
        return index.tensor_split(self.size)[self.rank] if self.size > 1 else index

    def weighted_mean(self, value: float, weight: float) -> float:
        """sum(value * weight) / sum(weight) over ranks."""
        if self.size == 1:
            return value
        t = torch.tensor([value * weight, weight], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return float(t[0] / t[1])

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


SINGLE = World()  # the world of one process
