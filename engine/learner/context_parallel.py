"""Context parallelism by all-gathered keys and values: the split of sequences over CP ranks and back.

Layout (Megatron's CP convention): a sequence whose length is a multiple of 2 * cp is cut into 2 * cp
equal chunks and CP rank r holds chunks r and 2 * cp - 1 - r, so every rank gets the same share of the
causal attention work. Padded micro-batches cut every row along its (padded) length; packed rows cut
every sequence separately (each one padded to a multiple of 2 * cp first).

Guarantees:
- `local_index` lists, in order, the positions a rank holds; over the ranks of a group these lists cover
  every position exactly once, and `merge` puts the ranks' slices back in sequence order;
- `gather_kv` all-gathers a tensor over the CP group in the forward pass, and in the backward pass sums
  the gradients every rank computed for it and hands each rank its own slice (a reduce-scatter);
- `gather_replicated` all-gathers a per-token result (log-probs, values) that every rank then uses in the
  same way (the same loss computed on every rank): its backward keeps this rank's slice of the gradient
  and sums nothing, so a parameter's gradient summed over CP ranks is exactly the unsplit one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def round_up(n: int, cp: int) -> int:
    """n rounded up to a multiple of 2 * cp (the length a sequence is padded to before it is split)."""
    return -(-n // (2 * cp)) * 2 * cp


def chunk_index(length: int, cp: int, rank: int) -> torch.Tensor:
    """Positions of chunks rank and 2 * cp - 1 - rank of a sequence of this length (a multiple of 2 * cp)."""
    if length % (2 * cp):
        raise ValueError(f"a sequence of {length} positions cannot be cut into 2 * {cp} equal chunks")
    c = length // (2 * cp)
    first, second = rank * c, (2 * cp - 1 - rank) * c
    return torch.cat([torch.arange(first, first + c), torch.arange(second, second + c)])


def local_index(lengths: list[int], cp: int, rank: int) -> torch.Tensor:
    """Positions rank holds of sequences of these lengths laid end to end (each a multiple of 2 * cp)."""
    parts, start = [], 0
    for n in lengths:
        parts.append(chunk_index(n, cp, rank) + start)
        start += n
    return torch.cat(parts)


@dataclass(frozen=True)
class ContextSlice:
    """What one CP rank holds of a micro-batch's model row: `index` (positions along the sequence
    dimension, see `local_index`) of the rank `rank` in a group of `size` ranks."""

    lengths: list[int]  # the sequences laid end to end along the model row (one: a padded micro-batch)
    size: int
    rank: int
    group: Any  # the CP process group

    @property
    def index(self) -> torch.Tensor:
        return local_index(self.lengths, self.size, self.rank)

    def merge(self, parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The ranks' slices (parts[q]: rank q's, positions along dim) in sequence order."""
        return restore_order(torch.cat(parts, dim=dim), self.lengths, self.size, dim)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's per-position result x (positions along dim) merged with every other rank's; the
        gradient is this rank's slice (see `gather_replicated`)."""
        return self.merge(gather_replicated(x, dim, self.group, self.size), dim)


@dataclass(frozen=True)
class ContextGroup:
    """This rank's CP group: its size, this rank's place in it and the process group."""

    size: int
    rank: int
    group: Any

    def slice(self, lengths: list[int]) -> ContextSlice:
        return ContextSlice(list(lengths), self.size, self.rank, self.group)


def restore_order(joined: torch.Tensor, lengths: list[int], cp: int, dim: int) -> torch.Tensor:
    """The ranks' slices concatenated in rank order along dim (rank q's positions: local_index(lengths,
    cp, q)) rearranged into sequence order."""
    order = torch.cat([local_index(lengths, cp, q) for q in range(cp)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return joined.index_select(dim, inverse.to(joined.device))


def rope_on_this_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group: Any) -> torch.Tensor:
    """Megatron's `get_pos_emb_on_this_cp_rank` without its pinned-memory CUDA copy: the rotary
    embeddings of the positions this CP rank holds (chunks r and 2 * cp - 1 - r)."""
    index = chunk_index(pos_emb.shape[seq_dim], cp_group.size(), cp_group.rank())
    return pos_emb.index_select(seq_dim, index.to(pos_emb.device))


def _all_gather(x: torch.Tensor, group: Any, size: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


class _GatherKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any, size: int) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.size = dim, group, size
        return torch.cat(_all_gather(x, group, size), dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        parts = [p.contiguous() for p in grad.chunk(ctx.size, dim=ctx.dim)]
        mine = torch.empty_like(parts[0])
        if dist.get_backend(ctx.group) == "gloo":  # gloo has no reduce-scatter: sum all, keep ours
            total = grad.contiguous()
            dist.all_reduce(total, group=ctx.group)
            mine = total.chunk(ctx.size, dim=ctx.dim)[dist.get_rank(ctx.group)].contiguous()
        else:
            dist.reduce_scatter(mine, parts, group=ctx.group)
        return mine, None, None, None


class _GatherReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any, size: int) -> torch.Tensor:
        ctx.dim, ctx.rank, ctx.size = dim, dist.get_rank(group), size
        return torch.cat(_all_gather(x, group, size), dim=dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return grad.chunk(ctx.size, dim=ctx.dim)[ctx.rank].contiguous(), None, None, None


def gather_kv(x: torch.Tensor, dim: int, group: Any, size: int) -> torch.Tensor:
    """Every rank's x concatenated along dim in rank order; backward: reduce-scatter of the gradient."""
    return _GatherKV.apply(x, dim, group, size)


def gather_replicated(x: torch.Tensor, dim: int, group: Any, size: int) -> list[torch.Tensor]:
    """Every rank's x (equal shapes), in rank order; backward: this rank's slice of the gradient only."""
    return list(_GatherReplicated.apply(x, dim, group, size).chunk(size, dim=dim))
