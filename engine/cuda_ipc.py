"""Weight buckets shared between processes on one GPU through CUDA IPC: the push without a host copy.

Guarantee: `share(tensors, max_bytes)` lays HF-named GPU tensors, in order, into flat byte buffers on
their GPU (each at most max_bytes, a larger tensor alone; every tensor at a 256-byte aligned offset) and
returns one picklable `SharedBucket` per buffer. In another process on the same GPU, `SharedBucket.open()`
gives back the same named tensors (same dtypes, shapes and values) as views of the sender's memory: no
byte goes through the host. They stay valid while the sender holds the buffers (SharedBuckets keeps the
last two pushes') and torch's CUDA IPC reference counting keeps a buffer alive while a receiver maps it.

Ray carries a SharedBucket as a small message (the IPC handle and a table of names, dtypes, shapes and
offsets); the tensors themselves never leave the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ALIGN = 256


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # bytes into the bucket
    nbytes: int


@dataclass(frozen=True)
class SharedBucket:
    """One flat GPU buffer shared by CUDA IPC, and where each named tensor lies in it."""

    handle: tuple[Any, tuple]  # torch.multiprocessing.reductions.reduce_tensor of the buffer
    entries: tuple[Entry, ...]

    def open(self) -> dict[str, torch.Tensor]:
        """The bucket's tensors, mapped from the sender's GPU memory (call in the receiving process)."""
        rebuild, args = self.handle
        return unpack(rebuild(*args), self.entries)


def bucket_bytes(entries: list[Entry] | tuple[Entry, ...]) -> int:
    return entries[-1].offset + entries[-1].nbytes


def pack(named: dict[str, torch.Tensor], entries: list[Entry] | tuple[Entry, ...]) -> torch.Tensor:
    """One flat byte buffer, on the tensors' device, holding them where `entries` says."""
    flat = torch.empty(bucket_bytes(entries), dtype=torch.uint8, device=named[entries[0].name].device)
    for e in entries:
        t = named[e.name]
        flat[e.offset : e.offset + e.nbytes].view(t.dtype).view(t.shape).copy_(t)
    return flat


def unpack(flat: torch.Tensor, entries: list[Entry] | tuple[Entry, ...]) -> dict[str, torch.Tensor]:
    """The named tensors of a flat buffer (views, no copy)."""
    return {
        e.name: flat[e.offset : e.offset + e.nbytes].view(getattr(torch, e.dtype)).view(e.shape)
        for e in entries
    }


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan(named: dict[str, torch.Tensor], max_bytes: int) -> list[list[Entry]]:
    """Cut the tensors, in order, into buckets of at most max_bytes (padding included; a tensor larger
    than max_bytes alone), each tensor at an aligned offset."""
    buckets: list[list[Entry]] = []
    end = 0
    for name, t in named.items():
        nbytes = t.numel() * t.element_size()
        offset = _aligned(end)
        if not buckets or (offset + nbytes > max_bytes and buckets[-1]):
            buckets.append([])
            offset = 0
        dtype = str(t.dtype).removeprefix("torch.")
        buckets[-1].append(Entry(name, dtype, tuple(t.shape), offset, nbytes))
        end = offset + nbytes
    return buckets


class SharedBuckets:
    """The sender's side: the buffers of the last two pushes stay alive (a receiver may still be loading
    the previous push when the next one is cut), older ones are freed."""

    def __init__(self) -> None:
        self._kept: list[list[torch.Tensor]] = []

    def share(self, named: dict[str, torch.Tensor], max_bytes: int) -> list[SharedBucket]:
        from torch.multiprocessing.reductions import reduce_tensor

        out, buffers = [], []
        for entries in plan(named, max_bytes):
            flat = pack(named, entries)
            buffers.append(flat)
            out.append(SharedBucket(handle=reduce_tensor(flat), entries=tuple(entries)))
        torch.cuda.current_stream().synchronize()  # the copies are done before anyone maps the buffers
        self._kept = [*self._kept[-1:], buffers]
        return out
