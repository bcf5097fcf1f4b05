"""Where learner ranks and embedded engines sit on GPUs, how weights travel between them, and what memory
each phase of a step uses.

Guarantees: on a cluster without GPUs every actor asks for none (CPU run); with at least one GPU per
learner rank and engine each gets a whole one; with fewer they share equally (one GPU: learner and engine
half each, as colocated mode needs). Weights go by CUDA IPC exactly when learner rank 0 and every engine
report the same physical GPU; otherwise through Ray's object store.
"""

from __future__ import annotations

from typing import Any

import ray

from engine.config import Config


def gpu_share(cfg: Config) -> float:
    """The share of a GPU each learner rank and embedded engine asks for (SGLang servers hold GPUs of
    their own through placement groups, so learner ranks then take a whole one)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.inference.backend == "sglang":
        return 1.0
    need = cfg.cluster.learner_ranks + cfg.inference.num_engines
    if not gpus or gpus >= need:
        return 1.0
    per_gpu = -(-need // int(gpus))  # actors that must share each GPU
    return 1.0 / per_gpu


def same_gpu(learner_rank0: dict[str, Any], engines: list[Any]) -> bool:
    """Learner rank 0 (its ready() report) and every engine on one physical GPU: CUDA IPC can carry the
    weights."""
    rank0 = learner_rank0.get("gpu_uuid")
    uuids = ray.get([e.gpu_uuid.options(max_task_retries=-1).remote() for e in engines])
    return rank0 is not None and bool(uuids) and all(u == rank0 for u in uuids)


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
