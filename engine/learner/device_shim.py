"""A small shim that lets Megatron-core run on CPU with gloo.

Megatron-core asks CUDA for two things even when every tensor lives on the CPU: the current device
(rotary embeddings move their frequencies to it) and the CUDA RNG tracker (attention forks the
model-parallel RNG state around dropout). On a machine without CUDA this module maps the first to "cpu"
and installs a tracker with the same interface that forks the CPU generator instead. It changes nothing
when CUDA is available, and installing it twice is harmless.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from megatron.core.tensor_parallel import random as mrandom

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
    tracker = CPURNGStatesTracker()
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + tp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _installed = True
