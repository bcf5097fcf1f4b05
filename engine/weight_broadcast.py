"""Weights from learner rank 0 to embedded engines by broadcast, in a process group of their own: NCCL
between GPUs (engines on other GPUs than the learner's), gloo on the CPU.

Guarantees:
- `BroadcastPush` forms one group of learner rank 0 (rank 0) and the engines (ranks 1..n) and fixes the
  bucket layout once: names, dtypes, shapes and offsets of rank 0's HF-named export cut into buckets of
  update_weight_buffer_size bytes (engine/cuda_ipc.plan; they do not change between pushes). A push is
  one broadcast per bucket in layout order, straight from the learner's device memory (no host copy
  between GPUs); an engine applies it as one version once the last bucket is in, like the other paths;
- learner rank 0 keeps the last pushed weights, so an engine that Ray restarts is given them without the
  group (`LearnerHeld`: a host copy through Ray, once per restart), and the next push forms a new group
  that includes it. An engine dying during a broadcast fails that push (the run ends; resume from the
  last checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
import torch
import torch.distributed as dist

from engine.cluster import free_port
from engine.cuda_ipc import Entry, bucket_bytes, pack, unpack

Layout = list[list[Entry]]


@dataclass(frozen=True)
class LearnerHeld:
    """A push's weights as learner rank 0 holds them; an engine restarted later fetches them."""

    holder: Any  # rank 0's LearnerWorker actor
    version: int

    def fetch(self) -> Any:
        """An ObjectRef to the weights (HF names, host tensors)."""
        return self.holder.held_weights.remote(self.version)


def send_buckets(group: Any, layout: Layout, named: dict[str, torch.Tensor]) -> int:
    """Rank 0: every bucket packed and broadcast, in order; returns the bytes sent."""
    sent = 0
    for entries in layout:
        flat = pack(named, entries)
        dist.broadcast(flat, src=0, group=group)
        sent += flat.numel()
    return sent


def receive_buckets(group: Any, layout: Layout, device: torch.device) -> dict[str, torch.Tensor]:
    """Ranks 1..n: every bucket received, in order; the named tensors (views of the received buffers)."""
    named: dict[str, torch.Tensor] = {}
    for entries in layout:
        flat = torch.empty(bucket_bytes(entries), dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=0, group=group)
        named.update(unpack(flat, entries))
    return named


class BroadcastPush:
    """The controller's side: the group, its layout, and one push per version."""

    def __init__(self, learner: Any, engines: list[Any], max_bytes: int, backend: str) -> None:
        self.learner, self.engines, self.backend = learner, engines, backend
        self.layout: Layout = [b for b in learner.weight_layout(max_bytes) if b]
        self.name: str | None = None
        self._pids: list[int] = []
        self._formed = 0

    def _form(self) -> str:
        """The group over rank 0 and the engines as they are now (a new one after an engine restart)."""
        pids = ray.get([e.pid.options(max_task_retries=-1).remote() for e in self.engines])
        if self.name is not None and pids == self._pids:
            return self.name
        old, self._formed = self.name, self._formed + 1
        name = f"engine_broadcast_{self._formed}"
        address, port, world = "127.0.0.1", free_port(), 1 + len(self.engines)
        if old is not None:  # engines still in the old group leave it; a restarted one never joined
            alive = [e for e, a, b in zip(self.engines, pids, self._pids, strict=True) if a == b]
            ray.get([e.leave_weight_group.remote(old) for e in alive] + [self.learner.leave_group(old)])
        joins = [self.learner.join_group(address, port, world, name, self.backend)]
        joins += [
            e.join_weight_group.remote(address, port, i + 1, world, name, self.backend)
            for i, e in enumerate(self.engines)
        ]
        ray.get(joins)
        self.name, self._pids = name, pids
        return name

    def push(self, version: int, mode: str) -> tuple[list[Any], LearnerHeld]:
        """Start the engines' receives, broadcast from the learner (blocks until sent); returns the
        engines' acknowledgements (ObjectRefs of the version each holds) and the held weights' handle."""
        name = self._form()
        applied = [e.receive_weights.remote(name, self.layout, version, mode) for e in self.engines]
        self.learner.broadcast_weights(name, self.layout, version)
        return applied, LearnerHeld(self.learner.workers[0], version)
