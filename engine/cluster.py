"""[cluster] config and the Ray runtime: start a local instance or join one, and always leave it clean.

`ray_session` is a context manager: whatever happens inside (completion, an exception, Ctrl-C), the Ray
instance it started is shut down, so no actor process outlives the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from engine.configbase import Section

log = logging.getLogger(__name__)


class ClusterConfig(Section, kw_only=True):
    """[cluster]: where the actors run."""

    section_name = "cluster"

    # Ray address to join ("auto" or "host:port"); unset starts a local instance.
    address: str | None = None
    # CPUs a local instance advertises; unset means os.cpu_count().
    num_cpus: int | None = None
    # Learner processes (Megatron ranks). Data parallel = learner_ranks / tensor_model_parallel_size.
    learner_ranks: int = 1
    # torch intra-op threads in each engine and learner process; 0 means the machine's core count.
    torch_threads: int = 0
    # Pin engine i to core i and learner rank r to core num_engines + r (modulo the cores), so neither
    # migrates between cores (for benchmarks; the producer, buffer and controller float).
    pin_cores: bool = False

    def check(self) -> None:
        self.positive("num_cpus", "learner_ranks")
        self.non_negative("torch_threads")

    def threads(self) -> int:
        return self.torch_threads or (os.cpu_count() or 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on host now (for a rendezvous that starts right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pin_to_core(core: int | None) -> None:
    """Run this process (all its threads) on one core; None leaves it free."""
    if core is not None:
        os.sched_setaffinity(0, {core % (os.cpu_count() or 1)})


def actor_options(**extra: Any) -> dict[str, Any]:
    """Ray options for this project's actors: no CPU reservation (they share the machine's cores and
    set their own thread counts), placed on the driver's node. The learner's rendezvous and the sample
    socket use loopback addresses, so in this version every actor runs where the driver runs, also
    when the driver joins a multi-node cluster."""
    node = ray.get_runtime_context().get_node_id()
    return {
        "num_cpus": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False),
        **extra,
    }


def gpus_per_actor(share: float = 1.0) -> float:
    """The GPUs a learner rank or an engine asks Ray for: none where the cluster has no GPU (everything
    runs on the CPU), else `share` of one (1: a GPU of its own; 0.5: two actors sharing one, colocated)."""
    return share if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def gpu_uuid() -> str | None:
    """The physical GPU this process uses (its CUDA device 0), or None without CUDA: two actors with the
    same UUID can share tensors by CUDA IPC."""
    import torch

    return str(torch.cuda.get_device_properties(0).uuid) if torch.cuda.is_available() else None


def gpu_memory(reset: bool = False) -> dict[str, float]:
    """This process' GPU memory in GiB: allocated now, the peak since the last reset, reserved by the
    allocator ({} without CUDA); reset starts a new peak."""
    import torch

    if not torch.cuda.is_available():
        return {}
    out = {
        "allocated_gib": torch.cuda.memory_allocated() / 2**30,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "reserved_gib": torch.cuda.memory_reserved() / 2**30,
    }
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return out


@contextlib.contextmanager
def ray_session(cfg: ClusterConfig, *, log_to_driver: bool = True) -> Iterator[None]:
    """Start (or join) Ray for the duration of the block; shut it down on every exit path."""
    started = not ray.is_initialized()
    if started:
        kwargs: dict = {"include_dashboard": False, "log_to_driver": log_to_driver}
        if cfg.address:
            ray.init(address=cfg.address, **kwargs)
        else:
            ray.init(num_cpus=cfg.num_cpus or os.cpu_count(), **kwargs)
        log.info("ray: %s", ray.get_runtime_context().gcs_address)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
