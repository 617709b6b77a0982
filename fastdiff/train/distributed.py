"""Data-parallel training on ``torch.distributed``: the process group, the shard of a batch each rank runs, and
the few collectives the trainer needs.

    torchrun --nproc-per-node 2 -m fastdiff train --run-dir runs/x ...            # one machine, 2 processes
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr HOST --master-port 29500 \
        -m fastdiff train ...                                                       # and --node-rank 1 on the other

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in every process;
:func:`setup` reads them and joins the group (gloo for CPU runs, NCCL for CUDA runs; each CUDA process takes the
GPU ``LOCAL_RANK`` of its node). Without those variables, or with a world of one, the trainer runs as a plain
single process and nothing here is used.

How a step is split (what keeps an N-process run equal to a 1-process run of the same configuration):

- ``batch_size`` is the *global* micro-batch: the trainer draws the same global index batch in every process
  (the seeded epoch permutations of the 1-process trainer) and rank r takes the contiguous rows
  ``[r B / N, (r + 1) B / N)`` of it (:func:`shard_slice`): the shards are disjoint and their union is the batch.
- The random draws of a step (timesteps, noise, label dropout, flips) are drawn for the whole global batch from
  the step's generator and sliced the same way, so every row gets the very numbers it gets in one process.
- Each rank's loss is the mean over its rows; DDP averages the gradients over the ranks, which is the mean over
  the global batch. Gradients are therefore identical on every rank after the all-reduce, and so are gradient
  clipping, the optimizer step and the EMA: every rank holds the same model without any further broadcast.
- Only rank 0 writes (config, checkpoints, logs, pictures); a checkpoint holds only global state (weights, EMA,
  optimizer, step), so a run can be resumed with another number of processes at the same ``batch_size``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "setup", "teardown", "shard_slice", "ForwardThrough", "SINGLE"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the data-parallel run (rank 0 of a world of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None      # gloo | nccl; None: a single process, no group

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """The average of each value over the ranks (fp64 on the host; a no-op in one process)."""
        if not self.enabled or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


SINGLE = DistContext()


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer (torchrun sets it), got {v!r}") from None


def backend_for(device: torch.device | str) -> str:
    """The process-group backend for a device type: NCCL on CUDA, gloo on the CPU."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "nccl"
    if kind == "cpu":
        return "gloo"
    raise ValueError(f"device must be cpu or cuda for data-parallel training, got {kind!r}")


def setup(device: torch.device | str) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (or the one already initialised) and return this process's
    context and the device it trains on (``cuda:LOCAL_RANK`` for CUDA runs).

    A process group the caller initialised itself is used as it is (its backend must suit the device).
    """
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        backend = str(dist.get_backend())
        local = _env_int("LOCAL_RANK", rank)
    else:
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return SINGLE, device
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(local)
            dist.init_process_group(backend, device_id=torch.device("cuda", local))
        else:
            dist.init_process_group(backend)
    if world > 1 and device.type == "cuda":
        if backend != "nccl":
            raise ValueError(f"CUDA training needs an nccl process group, got {backend}")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif world > 1 and "gloo" not in backend:
        raise ValueError(f"CPU training needs a gloo process group, got {backend}")
    return DistContext(rank=rank, world_size=world, local_rank=local, backend=backend if world > 1 else None), device


def teardown() -> None:
    """Leave the process group (if one is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_slice(global_batch: int, rank: int, world_size: int) -> slice:
    """The rows of a global (micro-)batch that ``rank`` runs: a contiguous ``global_batch / world_size`` block."""
    if global_batch % world_size:
        raise ValueError(f"batch_size {global_batch} (the global micro-batch) must be divisible by the number of "
                         f"processes {world_size}; choose a multiple of {world_size}")
    per = global_batch // world_size
    return slice(rank * per, (rank + 1) * per)


class ForwardThrough(nn.Module):
    """``forward(fn)`` returns ``fn()``: the one module :class:`~torch.nn.parallel.DistributedDataParallel` wraps.

    DDP hooks its gradient all-reduce into the module's forward call; a training loss that calls several methods
    of the model (an autoencoder's ``encode`` and ``decode``) runs inside this forward, so DDP sees one forward
    per micro-batch whatever the model kind. ``model`` is registered as a child so DDP finds its parameters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn()
