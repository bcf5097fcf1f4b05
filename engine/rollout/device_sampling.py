"""The (seed, position) uniforms of engine/rollout/sampling.py computed on the device, and a draw from them.

Guarantee: `device_uniforms(seeds, positions)` is bit-for-bit `position_uniforms` (numpy uint64), done
with int64 tensors on any device: two's-complement multiplication and addition wrap modulo 2**64 like
uint64 arithmetic, and right shifts are made logical by masking the sign-extended bits. So a request
draws the same tokens whichever engine serves it, and no per-token host round trip is needed to build
the uniforms; `draw` is `sample_next` with the truncation decided up front (no device-to-host read),
so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.rollout.sampling import sample_next

_U64 = 1 << 64


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned value."""
    value &= _U64 - 1
    return value - _U64 if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values seen as uint64."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shift_right(x, 30)) * _M1
    x = (x ^ _shift_right(x, 27)) * _M2
    return x ^ _shift_right(x, 31)


def as_int64_seeds(seeds: np.ndarray) -> np.ndarray:
    """uint64 seeds as the int64 values with the same bits (for int64 device tensors)."""
    return np.asarray(seeds, dtype=np.uint64).view(np.int64)


def device_uniforms(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in (0, 1) per row; seeds and positions are int64 tensors of one shape."""
    h = _mix64(seeds + _GOLDEN * (positions + 1))
    return (_shift_right(h, 11).double() + 0.5) / float(1 << 53)


def draw(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    truncate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_next with device uniforms: (tokens [B] long, log-probs [B] float32), all on logits' device.

    truncate must be True when any row has top_k > 0 (below the vocabulary) or top_p < 1."""
    uniforms = device_uniforms(seeds, positions)
    return sample_next(logits, temperature, top_p, top_k, uniforms, truncate=truncate)


def truncates(top_p: float, top_k: int, vocab: int) -> bool:
    """Whether sampling parameters cut the vocabulary (top-k or nucleus)."""
    return 0 < top_k < vocab or top_p < 1.0
