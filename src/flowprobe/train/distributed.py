"""Data-parallel plumbing of the loop: the process group's rank and size, joining it under ``torchrun``, and
the all-reduce of logged losses. Batch slicing lives with the batch (:func:`flowprobe.train.loop.batch_functions`)."""

from __future__ import annotations

import os

import torch

__all__ = ["distributed_info", "init_distributed", "mean_over_ranks"]


def distributed_info() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> tuple[torch.device | None, bool]:
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, else gloo) and pick this rank's
    device (``device`` is the resolved device of the command; CUDA ranks take ``cuda:LOCAL_RANK``).
    Returns (device or None when not distributed, whether a group was started here)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None, False
    dev = device
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev, True


def mean_over_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of ``values`` over the ``world`` ranks (all-reduce); the tensor itself when ``world == 1``."""
    if world == 1:
        return values
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values / world
