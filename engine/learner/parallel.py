"""Process-group set-up for one learner rank: torch.distributed, Megatron's parallel state, CPU shim.

Guarantee: after `init_parallel`, Megatron's tensor-, pipeline-, context- and data-parallel groups exist
for this rank, on gloo when there is no GPU (NCCL otherwise), Megatron's model-parallel RNG states are
seeded, and its CUDA-only calls work on the CPU.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

from engine.learner.device_shim import install_cpu_shim


def init_parallel(
    rank: int,
    world_size: int,
    tp: int,
    master: str,
    seed: int,
    timeout_s: float = 600,
    *,
    pp: int = 1,
    ep: int = 1,
    cp: int = 1,
) -> None:
    """Join the learner's process group at `master` (tcp://host:port) and build Megatron's groups: tp
    tensor-parallel ranks (consecutive), pp pipeline stages, data parallelism over the rest; MoE experts
    split over ep expert-parallel ranks (consecutive data-parallel ranks); cp context-parallel ranks
    (after the tensor-parallel ones, Megatron's order) share each sequence."""
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
        mpu.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            context_parallel_size=cp,
        )
    if torch.cuda.is_available():
        # Megatron's model-parallel CUDA RNG states (attention and dropout fork them), seeded per TP rank.
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:
        install_cpu_shim(seed, mpu.get_tensor_model_parallel_rank())
