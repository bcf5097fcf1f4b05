"""The learner as the controller sees it: N LearnerWorker actors driven in lock step.

Every collective call (train, export, save) is sent to all ranks at once, and the call returns only
when every rank has finished, so no rank is ever left inside a collective the others skipped.
"""

from __future__ import annotations

from typing import Any

import ray

from engine.cluster import actor_options, free_port, gpus_per_actor
from engine.learner.config import LearnerSpec
from engine.learner.worker import LearnerWorker


class LearnerGroup:
    def __init__(
        self,
        ranks: int,
        spec: LearnerSpec,
        gpu_share: float = 1.0,
        placement: list[dict[str, Any]] | None = None,
    ) -> None:
        """ranks LearnerWorker actors; on a cluster with GPUs each takes gpu_share of one (CUDA, NCCL);
        gpu_share = 0 keeps them on the CPU (gloo) on any machine. `placement`: Ray options per rank
        (a placement-group bundle and its GPU share) in place of those."""
        master = f"tcp://127.0.0.1:{free_port()}"
        actor = ray.remote(LearnerWorker)
        options = actor_options(num_gpus=gpus_per_actor(gpu_share))
        if gpu_share == 0:
            options["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
        per_rank = placement or [{}] * ranks
        self.workers = [
            actor.options(**{**options, **per_rank[rank]}).remote(
                rank=rank, world_size=ranks, master=master, spec=spec
            )
            for rank in range(ranks)
        ]
        self.info: list[dict[str, Any]] = ray.get([w.ready.remote() for w in self.workers])

    def _all(self, method: str, *args: Any) -> list[Any]:
        return ray.get([getattr(w, method).remote(*args) for w in self.workers])

    def train(self, samples_ref: Any, num_steps: int) -> list[dict[str, float]]:
        """Train every rank on the rollout behind samples_ref (an ObjectRef; it never passes through here)."""
        return self._all("train", samples_ref, num_steps)[0]

    def export_weights(self) -> Any:
        """An ObjectRef to rank 0's HF-named weights, after every rank has taken part in the gather."""
        refs = [w.export_hf.remote() for w in self.workers]
        ray.get(refs[1:])
        ray.wait(refs[:1])
        return refs[0]

    def export_weight_buckets(self, max_bytes: int) -> Any:
        """An ObjectRef to the list of ObjectRefs of rank 0's weight buckets (each at most max_bytes)."""
        refs = [w.export_hf_buckets.remote(max_bytes) for w in self.workers]
        ray.get(refs[1:])
        ray.wait(refs[:1])
        return refs[0]

    def export_shared_buckets(self, max_bytes: int) -> Any:
        """As export_weight_buckets, but the buckets stay on rank 0's GPU and travel as CUDA IPC handles."""
        refs = [w.export_hf_shared.remote(max_bytes) for w in self.workers]
        ray.get(refs[1:])
        ray.wait(refs[:1])
        return refs[0]

    def weight_layout(self, max_bytes: int) -> list[Any]:
        """Rank 0's broadcast bucket layout (engine/weight_broadcast.py)."""
        return self._all("weight_layout", max_bytes)[0]

    def join_group(self, address: str, port: int, world: int, name: str, backend: str) -> Any:
        """Rank 0 joins a weight group as its rank 0; an ObjectRef to wait on with the other members."""
        return self.workers[0].join_weight_group.remote(address, port, world, name, backend)

    def leave_group(self, name: str) -> Any:
        return self.workers[0].leave_weight_group.remote(name)

    def export_tensor_payloads(self, max_bytes: int, version: int, keep_host_copy: bool) -> list[str]:
        """Rank 0's /update_weights_from_tensor payloads for colocated SGLang servers (WeightsOut)."""
        return self._all("export_tensor_payloads", max_bytes, version, keep_host_copy)[0]

    def drop_tensor_payloads(self) -> None:
        ray.get(self.workers[0].drop_tensor_payloads.remote())

    def broadcast_weights(self, name: str, layout: list[Any], version: int) -> None:
        """Every rank exports, rank 0 broadcasts (returns once rank 0 has sent every bucket)."""
        self._all("broadcast_weights", name, layout, version)

    def sleep(self) -> None:
        """Colocated mode: every rank frees what training alone needs (LearnerWorker.sleep)."""
        self._all("sleep")

    def wake(self) -> None:
        self._all("wake")

    def memory(self, reset: bool = False) -> list[dict[str, float]]:
        return self._all("memory", reset)

    def save_state(self, path: str) -> None:
        """Every rank writes its state into the iteration directory `path` (engine/learner/checkpoint.py)."""
        self._all("save_state", path)

    def save_hf(self, path: str) -> str:
        return self._all("save_hf", path)[0]

    def compute_logprobs(self, samples: Any) -> list[Any]:
        return self._all("compute_logprobs", samples)[0]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
