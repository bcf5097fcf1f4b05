"""A KV cache allocated once: one slot of `capacity` positions per sequence, for every layer.

Guarantees: the tensors are allocated at construction and never reallocated (so CUDA graphs may hold
their addresses); slot r holds, at position p, the key and value of the token at position p of the
sequence in slot r; `move` copies whole slots so that live sequences can be kept in slots 0..n-1.
"""

from __future__ import annotations

import torch

from engine.errors import ConfigError

# The capacity is rounded up to this many positions: attention kernels want aligned key lengths.
ALIGN = 64


class SlotCache:
    """keys/values: [layers, slots, capacity, kv_heads, head_dim] each, in the model's dtype."""

    def __init__(
        self,
        *,
        layers: int,
        slots: int,
        context_length: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.context_length = context_length
        self.capacity = -(-context_length // ALIGN) * ALIGN
        shape = (layers, slots, self.capacity, kv_heads, head_dim)
        need = 2 * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if need > 0.9 * free:
                raise ConfigError(
                    f"the KV cache needs {need / 2**30:.1f} GiB ({slots} slots x {self.capacity} positions "
                    f"x {layers} layers), more than the {free / 2**30:.1f} GiB free on {device}: lower "
                    "inference.context_length or inference.max_batch_size",
                    section="inference",
                    key="context_length",
                )
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = slots
        self.nbytes = need

    def release(self) -> None:
        """Give the cache's memory back (the tensors keep their shapes but have no storage until
        restore); whatever pointed at the old memory (captured graphs) must be dropped."""
        for cache in (self.keys, self.values):
            cache.untyped_storage().resize_(0)

    def restore(self) -> None:
        """Memory again (at new addresses), zeroed."""
        for cache in (self.keys, self.values):
            cache.untyped_storage().resize_(cache.numel() * cache.element_size())
            cache.zero_()

    @torch.no_grad()
    def move(self, src: list[int], dst: list[int], length: int) -> None:
        """Copy the first `length` positions of slots src into slots dst (disjoint lists, pairwise)."""
        if not src:
            return
        device = self.keys.device
        s = torch.tensor(src, dtype=torch.long, device=device)
        d = torch.tensor(dst, dtype=torch.long, device=device)
        for cache in (self.keys, self.values):
            cache[:, d, :length] = cache[:, s, :length]
