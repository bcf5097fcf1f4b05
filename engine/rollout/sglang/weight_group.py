"""The weight-update process group between learner rank 0 and SGLang servers, both ends.

Guarantees: `join_group` builds the group the way SGLang 0.5.9's /init_weights_update_group does
(rendezvous at tcp://master_address:master_port, a store prefixed by the group name, rank 0 the
sender, server ranks from their rank_offset), so either end can be this module or SGLang itself;
`WeightSender.broadcast_bucket` sends a bucket's tensors in the bucket's order from rank 0, which is the
order of the names, dtypes and shapes the servers were sent first (`describe_bucket`).
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import (
    Backend,
    PrefixStore,
    _new_process_group_helper,
    _world,
    rendezvous,
)


def join_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str,
    timeout_s: float = 600.0,
) -> Any:
    """A process group of its own (the default group, if any, is untouched)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(
        rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        PrefixStore(group_name, store),
        group_name=group_name,
        timeout=timeout,
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": the spelling SGLang resolves with getattr(torch, name)."""
    return str(dtype).removeprefix("torch.")


def describe(bucket: dict[str, torch.Tensor]) -> dict[str, list]:
    """The metadata of /update_weights_from_distributed for this bucket, in its order."""
    return {
        "names": list(bucket),
        "dtypes": [dtype_name(t.dtype) for t in bucket.values()],
        "shapes": [list(t.shape) for t in bucket.values()],
    }


def receive(group: Any, names: list[str], dtypes: list[str], shapes: list[list[int]], device: str = "cpu"):
    """The servers' end: one broadcast from rank 0 per name, in order; returns [(name, tensor)]."""
    out, handles = [], []
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        handles.append(dist.broadcast(tensor, src=0, group=group, async_op=True))
        out.append((name, tensor))
    for handle in handles:
        handle.wait()
    return out


class WeightSender:
    """Rank 0 of weight-update groups (held by learner rank 0, or used as a Ray actor on its own)."""

    def __init__(self) -> None:
        self.groups: dict[str, Any] = {}
        self.device = "cpu"

    def join_weight_group(
        self, address: str, port: int, world_size: int, group_name: str, backend: str
    ) -> None:
        self.device = "cuda" if backend == "nccl" else "cpu"  # NCCL sends from the GPU
        self.groups[group_name] = join_group(address, port, 0, world_size, group_name, backend)

    def leave_weight_group(self, group_name: str) -> None:
        group = self.groups.pop(group_name, None)
        if group is not None:
            dist.destroy_process_group(group)

    def describe_bucket(self, bucket: dict[str, torch.Tensor]) -> dict[str, list]:
        return describe(bucket)

    def broadcast_bucket(self, group_name: str, bucket: dict[str, torch.Tensor]) -> int:
        """Send every tensor of the bucket, in order; returns the bytes sent."""
        group = self.groups[group_name]
        tensors = [t.to(self.device).contiguous() for t in bucket.values()]
        handles = [dist.broadcast(t, src=0, group=group, async_op=True) for t in tensors]
        for handle in handles:
            handle.wait()
        return sum(t.numel() * t.element_size() for t in tensors)
