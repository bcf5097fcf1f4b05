"""Weight pushes from the learner to SGLang servers, and the rollout modes mapped onto SGLang calls.

Disaggregated (`push`): on first use (and after any server restart) a weight-update group is formed,
learner rank 0 (the sender) at rank 0 and server i from rank_offset 1 + the tp sizes before it. Per
push, with rollout.on_weight_update:
- "continue": POST /pause_generation {"mode": "in_place"}, the update, POST /continue_generation:
  running requests keep their KV cache and go on decoding with the new weights;
- "resume": POST /pause_generation {"mode": "abort"} (running requests come back with finish_reason
  abort and their tokens so far, for the producer to resume), the update, /continue_generation;
- "wait": no pause: SGLang's update waits until the requests in flight have finished, so the whole
  model travels in one update call (the sender still sends it bucket by bucket).
An update is, per bucket, POST /update_weights_from_distributed with the bucket's names, dtypes and
shapes to every server, while the sender broadcasts the bucket's tensors in that order; the last call
carries weight_version = str(version) and flush_cache. Every server then reports that version, and
its server actor keeps the buckets, to reload them after a restart.

Colocated (`release` / `push_tensors`): servers release their memory before training and take the
weights back as tensors (/update_weights_from_tensor: CUDA IPC handles, no copy through the network).
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from engine.cluster import free_port
from engine.errors import EngineError
from engine.rollout.sglang.tensors import serialize_named_tensors

log = logging.getLogger(__name__)


class SglangWeightSync:
    """Driver-side: pushes weights from `sender` (learner rank 0, or a WeightSender actor: both
    have WeightSender's methods) to the server actors. Calls block until every server holds the version."""

    def __init__(
        self, servers: list[Any], tp_sizes: list[int], sender: Any, *, backend: str = "nccl"
    ) -> None:
        self.servers, self.tp_sizes, self.sender, self.backend = servers, tp_sizes, sender, backend
        self.group_name: str | None = None
        self._incarnations: list[int] | None = None
        self._groups = 0

    def _form_group(self) -> str:
        """A fresh group over the sender and every server (the old one, if any, is left first)."""
        incarnations = [info["incarnation"] for info in ray.get([s.info.remote() for s in self.servers])]
        if self.group_name is not None and incarnations == self._incarnations:
            return self.group_name
        if self.group_name is not None:  # a server was restarted: its old group is gone with it
            old = self.group_name
            assert self._incarnations is not None
            same = zip(self.servers, incarnations, self._incarnations, strict=True)
            kept = [s for s, a, b in same if a == b]
            ray.get(
                [self.sender.leave_weight_group.remote(old)]
                + [s.call.remote("POST", "/destroy_weights_update_group", {"group_name": old}) for s in kept]
            )
        self._groups += 1
        name = f"engine_weights_{self._groups}"
        address = ray.util.get_node_ip_address()
        port = free_port("")
        world = 1 + sum(self.tp_sizes)
        joins = [self.sender.join_weight_group.remote(address, port, world, name, self.backend)]
        offset = 1
        for server, tp in zip(self.servers, self.tp_sizes, strict=True):
            body = {
                "master_address": address,
                "master_port": port,
                "rank_offset": offset,
                "world_size": world,
                "group_name": name,
                "backend": self.backend,
            }
            joins.append(server.call.remote("POST", "/init_weights_update_group", body))
            offset += tp
        for answer in ray.get(joins)[1:]:
            if not answer.get("success"):
                raise EngineError(f"/init_weights_update_group failed: {answer.get('message')}")
        self.group_name, self._incarnations = name, incarnations
        return name

    def _all(self, path: str, body: dict[str, Any]) -> list[Any]:
        return ray.get([s.call.remote("POST", path, body) for s in self.servers])

    def push(self, buckets: list[Any], version: int, mode: str) -> list[int]:
        """Send the buckets (ObjectRefs of HF-named dicts, in order) as `version`; returns the versions
        the servers report afterwards."""
        group = self._form_group()
        if mode in ("continue", "resume"):
            self._all("/pause_generation", {"mode": "in_place" if mode == "continue" else "abort"})
        try:
            metas = ray.get([self.sender.describe_bucket.remote(b) for b in buckets])
            calls = [(metas, buckets)] if mode == "wait" else [([m], [b]) for m, b in zip(metas, buckets)]
            for i, (call_metas, call_buckets) in enumerate(calls):
                last = i == len(calls) - 1
                body = {
                    "names": [n for m in call_metas for n in m["names"]],
                    "dtypes": [d for m in call_metas for d in m["dtypes"]],
                    "shapes": [s for m in call_metas for s in m["shapes"]],
                    "group_name": group,
                    # SGLang cannot flush its prefix cache while requests are running (paused in place)
                    "flush_cache": last and mode != "continue",
                    "weight_version": str(version) if last else None,
                }
                path = "/update_weights_from_distributed"
                updates = [s.call.remote("POST", path, body) for s in self.servers]
                sent = [self.sender.broadcast_bucket.remote(group, b) for b in call_buckets]
                ray.get(sent)
                for answer in ray.get(updates):
                    if not answer.get("success"):
                        raise EngineError(f"/update_weights_from_distributed failed: {answer.get('message')}")
        finally:
            if mode in ("continue", "resume"):
                self._all("/continue_generation", {})
        ray.get([s.set_current.remote(list(buckets), version) for s in self.servers])
        return self.versions()

    def versions(self) -> list[int]:
        infos = ray.get([s.call.remote("GET", "/model_info") for s in self.servers])
        return [int(info["weight_version"]) for info in infos]

    # --- colocated ----------------------------------------------------------------------------------

    def release(self) -> None:
        """Before training on the shared GPUs: the servers free their weights and KV cache."""
        self._all("/release_memory_occupation", {"tags": None})

    def push_tensors(self, named: dict[str, Any], version: int) -> list[int]:
        """After training: weights back in, from tensors on this process's device, then the KV cache."""
        self._all("/resume_memory_occupation", {"tags": ["weights"]})
        answers = ray.get(
            [
                s.call.remote(
                    "POST",
                    "/update_weights_from_tensor",
                    {
                        "serialized_named_tensors": serialize_named_tensors(named, tp),
                        "flush_cache": True,
                        "weight_version": str(version),
                    },
                )
                for s, tp in zip(self.servers, self.tp_sizes, strict=True)
            ]
        )
        for answer in answers:
            if not answer.get("success"):
                raise EngineError(f"/update_weights_from_tensor failed: {answer.get('message')}")
        self._all("/resume_memory_occupation", {"tags": ["kv_cache"]})
        return self.versions()
