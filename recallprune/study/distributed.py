"""Data-parallel studies under ``torchrun``: which rank this process is, the share of a batch
or of the test set it takes, and the barrier after rank 0 writes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def share(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of ``indices`` (every ``world_size``-th, from its rank)."""
        return indices[self.rank :: self.world_size]

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def setup_distributed(device: torch.device) -> Distributed:
    """Join the process group when started by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
    return Distributed(torch.distributed.get_rank(), torch.distributed.get_world_size())
