"""Data-parallel fitting under a launcher (`torchrun`): which process this is, and the few collective
steps `fit_decoder` needs.

`torchrun --nproc_per_node=N` starts N copies of the same command and tells each its place through
the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT). `Distributed.from_environment`
reads it; with no launcher (or a world of one) it is the single-process context, whose every method
is a no-op, so a plain `dede fit` runs exactly the code it always ran.

Ranks split every global batch into disjoint contiguous shards (`shard`), so a fit of S steps at
global batch B sees the same S x B images whatever the number of processes; the decoder's gradient
is averaged across ranks by DistributedDataParallel. Rank 0 alone writes the run directory and
decides every stop; the other ranks follow its broadcast decisions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Distributed:
    """This process's place in a data-parallel fit (world_size 1: a plain single-process fit)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # this context started the process group, so it ends it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: str | None = None) -> Distributed:
        """The launcher's context, the process group started if it is not yet (backend nccl for CUDA
        devices, gloo for CPU); the single-process context when no launcher set WORLD_SIZE > 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        backend = "nccl" if use_cuda else "gloo"
        owns = False
        if not dist.is_initialized():
            if use_cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend=backend)
            owns = True
        else:
            backend = dist.get_backend()
        return cls(dist.get_world_size(), dist.get_rank(), local_rank, backend, owns)

    def device(self, requested: str | None) -> torch.device:
        """The device of this rank: cuda:LOCAL_RANK for any CUDA request under a launcher (one GPU
        per process), else the device asked for (default: CUDA when present)."""
        if requested:
            wanted = torch.device(requested)
        else:
            wanted = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.enabled and wanted.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return wanted

    def shard(self, n: int, rank: int | None = None) -> slice:
        """The contiguous share of n items (a global batch, the images to embed) of this rank, or of
        `rank`: the first n % world_size ranks take one more. The shards are disjoint and, in rank
        order, cover the n items."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.world_size)
        start = rank * base + min(rank, extra)
        return slice(start, start + base + (1 if rank < extra else 0))

    def shard_sizes(self, n: int) -> list[int]:
        return [len(range(n)[self.shard(n, r)]) for r in range(self.world_size)]

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def gather_rows(self, local: np.ndarray, n: int) -> np.ndarray:
        """Every rank's `local` rows (its `shard(n)` of n) concatenated in rank order, on every rank:
        the whole array when each rank computed its share (the local array when single-process)."""
        if not self.enabled:
            return local
        sizes = self.shard_sizes(n)
        if len(local) != sizes[self.rank]:
            raise ValueError(
                f"rank {self.rank} holds {len(local)} rows; its shard of {n} is {sizes[self.rank]}"
            )
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=torch.from_numpy(local).dtype)
        padded[: len(local)] = torch.from_numpy(local)
        padded = padded.to(self._collective_device())
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return np.concatenate([p[:size].cpu().numpy() for p, size in zip(parts, sizes, strict=True)])

    def broadcast(self, obj: Any) -> Any:  # noqa: ANN401 - any picklable object
        """Rank 0's `obj` on every rank (the object itself when single-process)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over ranks of a few floats (the values themselves when single-process)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.enabled:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def close(self) -> None:
        """End the process group if this context started it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
