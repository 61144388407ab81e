"""Data-parallel helpers over torch.distributed (gloo on CPUs, nccl on GPUs); no-ops for one process."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

_LOCAL = False  # inside local(): this process trains alone, whatever the launcher started
_TRAFFIC = {"all_reduce_calls": 0, "all_reduce_bytes": 0}  # this process's all-reduces through sum_


def active() -> bool:
    return not _LOCAL and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextmanager
def local() -> Iterator[None]:
    """Within the block every helper acts as for one process (no collectives): layer-sharded training,
    where each rank owns whole SAEs and nothing is exchanged."""
    global _LOCAL
    before, _LOCAL = _LOCAL, True
    try:
        yield
    finally:
        _LOCAL = before


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def sum_(t: Tensor) -> Tensor:
    """All-reduce (sum) in place; returns t."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        _TRAFFIC["all_reduce_calls"] += 1
        _TRAFFIC["all_reduce_bytes"] += t.numel() * t.element_size()
    return t


def traffic() -> dict[str, int]:
    """All-reduce calls and bytes this process has sent through sum_ so far (a copy)."""
    return dict(_TRAFFIC)


class FlatBuffer:
    """Gradients and extra tensors of several parameter groups as views of one fp32 buffer, so data parallel
    adds them all over ranks with a single all-reduce (sum_(flat.buffer)) per step. groups maps a key to
    (parameters, sizes of the extra 1-D tensors); extras[key] are those tensors. It holds every group's
    gradients at once; layer groups or layer sharding bound that."""

    def __init__(self, groups: dict[int, tuple[list[torch.nn.Parameter], list[int]]], device) -> None:
        total = sum(sum(p.numel() for p in params) + sum(extra) for params, extra in groups.values())
        self.buffer = torch.zeros(total, device=device)
        self.grads: dict[int, list[tuple[torch.nn.Parameter, Tensor]]] = {}
        self.extras: dict[int, list[Tensor]] = {}
        at = 0
        for key, (params, extra) in groups.items():
            self.grads[key] = []
            for p in params:
                self.grads[key].append((p, self.buffer[at : at + p.numel()].view_as(p)))
                at += p.numel()
            self.extras[key] = []
            for size in extra:
                self.extras[key].append(self.buffer[at : at + size])
                at += size

    def attach(self, key: int) -> None:
        """Make the group's .grad the buffer's views (a backward accumulates into them in place)."""
        for p, g in self.grads[key]:
            p.grad = g


def any_(mask: Tensor) -> Tensor:
    """Element-wise OR of a bool tensor over ranks."""
    if not active():
        return mask
    as_int = mask.to(torch.int32)
    dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
    return as_int.bool()


def cat(t: Tensor) -> Tensor:
    """Every rank's t concatenated along dim 0 in rank order (the same shape on every rank)."""
    if not active():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order (picklable objects; on every rank)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
