"""Summing across processes where there are several, and doing nothing where there is one."""

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every process, in place; unchanged on a single process."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor
