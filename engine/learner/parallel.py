"""Process-group set-up for one learner rank: torch.distributed, Megatron's parallel state, CPU shim.

Guarantee: after `init_parallel`, Megatron's tensor-parallel and data-parallel groups exist for this
rank, on gloo when there is no GPU (NCCL otherwise), and Megatron's CUDA-only calls work on the CPU.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

from engine.learner.device_shim import install_cpu_shim


def init_parallel(
    rank: int, world_size: int, tp: int, master: str, seed: int, timeout_s: float = 600
) -> None:
    """Join the learner's process group at `master` (tcp://host:port) and build Megatron's groups."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=master,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
    install_cpu_shim(seed, mpu.get_tensor_model_parallel_rank())
