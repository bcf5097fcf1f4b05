"""A small shim that lets Megatron-core run on CPU with gloo.

Megatron-core asks CUDA for things even when every tensor lives on the CPU: the current device
(rotary embeddings move their frequencies to it), the CUDA RNG tracker (attention forks the
model-parallel RNG state around dropout), stream synchronisation and "cuda" tensors (the pipeline
schedule and its p2p communication). On a machine without CUDA this module maps the current device to
"cpu", makes synchronisation a no-op, installs a tracker with the same interface that forks the CPU
generator instead (activation recomputation's save and restore of "the CUDA" RNG state use the CPU
generator too), the rotary embeddings of a context-parallel rank's positions are picked without a
pinned CUDA copy, and `cuda_as_cpu` creates tensors asked for on "cuda" on the CPU while it is active.
It changes nothing when CUDA is available, and installing it twice is harmless.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.tensor_parallel import random as mrandom
from torch.overrides import TorchFunctionMode

_installed = False


class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
    """Megatron's RNG tracker, keeping named CPU generator states instead of CUDA ones."""

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def install_cpu_shim(seed: int, tp_rank: int) -> None:
    """Map Megatron's CUDA-only calls to the CPU and seed the model-parallel RNG states."""
    global _installed
    if torch.cuda.is_available() or _installed:
        return
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    tracker = CPURNGStatesTracker()
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + tp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    # Activation recomputation saves and restores "the CUDA" RNG state around a recomputed forward: here
    # that is the CPU generator's (whose state it saves anyway).
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Rotary embeddings of a CP rank's positions: Megatron copies their index through pinned memory.
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    from engine.learner.context_parallel import rope_on_this_rank

    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = rope_on_this_rank
    _installed = True


class _CudaAsCpu(TorchFunctionMode):
    """Rewrites a `device="cuda..."` argument of any torch call to the CPU."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if isinstance(device, str | torch.device) and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


def cuda_as_cpu() -> contextlib.AbstractContextManager:
    """While active, tensors created on "cuda" are created on the CPU (a no-op when CUDA exists)."""
    return contextlib.nullcontext() if torch.cuda.is_available() else _CudaAsCpu()
