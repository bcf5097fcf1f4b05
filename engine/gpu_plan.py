"""Where learner ranks and embedded engines sit on GPUs, how weights travel between them, and what memory
each phase of a step uses.

Guarantees: on a cluster without GPUs every actor asks for none (CPU run); with at least one GPU per
learner rank and engine each gets a whole one; with fewer they share equally (one GPU: learner and engine
half each, as colocated mode needs). By default weights go by CUDA IPC exactly when learner rank 0 and
every engine report the same physical GPU, by NCCL broadcast when they are all on GPUs, otherwise through
Ray's object store.
"""

from __future__ import annotations

from typing import Any

import ray

from engine.config import Config
from engine.errors import ConfigError


def gpu_share(cfg: Config) -> float:
    """The share of a GPU each learner rank and embedded engine asks for (SGLang servers hold GPUs of
    their own through placement groups, so learner ranks then take a whole one, or share theirs with
    colocated servers: engine/rollout/sglang/colocate.py)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.inference.backend == "sglang":
        from engine.rollout.sglang.colocate import SHARE

        return SHARE if cfg.inference.colocate else 1.0
    need = cfg.cluster.learner_ranks + cfg.inference.num_engines
    if not gpus or gpus >= need:
        return 1.0
    per_gpu = -(-need // int(gpus))  # actors that must share each GPU
    return 1.0 / per_gpu


def weight_transfer(cfg: Config, learner_rank0: dict[str, Any], engines: list[Any]) -> str:
    """How weights reach the embedded engines (inference.weight_transfer; "auto": CUDA IPC when learner
    rank 0 and every engine share one physical GPU, an NCCL broadcast when all are on GPUs, else Ray's
    object store). A choice the placement cannot serve is a ConfigError."""
    rank0 = learner_rank0.get("gpu_uuid")
    uuids = ray.get([e.gpu_uuid.options(max_task_retries=-1).remote() for e in engines])
    same = rank0 is not None and bool(uuids) and all(u == rank0 for u in uuids)
    on_gpus = rank0 is not None and bool(uuids) and all(u is not None for u in uuids)
    want = cfg.inference.weight_transfer
    if want == "auto":
        return "cuda_ipc" if same else "broadcast" if on_gpus else "object_store"
    if want == "cuda_ipc" and not same:
        raise ConfigError(
            "is 'cuda_ipc', but learner rank 0 and the engines are not on one GPU",
            section="inference",
            key="weight_transfer",
        )
    return want


def phase_memory(learner: Any, engines: list[Any], phase: str) -> dict[str, float]:
    """GPU memory at the end of a phase (GiB): learner rank 0's and engine 0's peak during it and what
    each holds now; peaks are reset for the next phase. Empty on the CPU."""
    if learner.info[0]["device"] == "cpu":
        return {}
    rank0 = learner.memory(reset=True)[0]
    engine = {}
    if engines:  # retried on an engine Ray is restarting
        engine = ray.get(engines[0].memory.options(max_task_retries=-1).remote(True))
    out = {}
    for who, m in (("learner", rank0), ("engine", engine)):
        if m:
            out[f"memory/{phase}_{who}_peak_gib"] = m["peak_gib"]
            out[f"memory/{phase}_{who}_end_gib"] = m["allocated_gib"]
    return out
