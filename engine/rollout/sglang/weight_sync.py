"""Weight pushes from the learner to SGLang servers, and the rollout modes mapped onto SGLang calls.

Disaggregated (`start_push`): on first use (and after any server restart) a weight-update group is
formed, learner rank 0 (the sender) at rank 0 and server i from rank_offset 1 + the tp sizes before it.
Per push, with rollout.on_weight_update, each server actor runs (SglangServerActor.apply_distributed):
- "continue": POST /pause_generation {"mode": "in_place"}, the update, POST /continue_generation:
  running requests keep their KV cache and go on decoding with the new weights;
- "resume": POST /pause_generation {"mode": "abort"} (running requests come back with finish_reason
  abort and their tokens so far, for the producer to resume), the update, /continue_generation;
- "wait": no pause: SGLang's update waits until the requests in flight have finished, so the whole
  model travels in one update call (the sender still sends it bucket by bucket).
An update is, per bucket, POST /update_weights_from_distributed with the bucket's names, dtypes and
shapes, while the sender broadcasts the bucket's tensors in that order; the last call carries
weight_version = str(version) and flush_cache. `start_push` only submits: it returns the servers'
acknowledgements (ObjectRefs of the version each reports once its update is done) and the sender's
sends. Whoever must know that every server holds the version waits on the acknowledgements (the
producer's set_version takes them as arguments); the sender's own later calls run after its sends
(Ray runs one caller's calls to an actor in order), and `wait_sent` waits for the sends while
failing at once if a server's update fails (instead of leaving the sender in a broadcast nobody joins).

Colocated (`release` / `push_tensors`): before training the servers stop generating
(/pause_generation abort: nothing may run when SGLang releases memory) and release their weights, KV
cache and CUDA graphs (/release_memory_occupation with SGLang 0.5.9's tags); after training the
weights come back (/resume_memory_occupation {"tags": ["weights"]}), are loaded from tensors on the
learner's device (/update_weights_from_tensor, one call per bucket), the learner drops its copy, the KV
cache and CUDA graphs come back, and generation continues. Requests sent meanwhile wait in the paused
server, so no generation ever runs on released memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray

from engine.cluster import free_port
from engine.errors import EngineError
from engine.weight_broadcast import LearnerHeld

log = logging.getLogger(__name__)

PAUSE = {"continue": "in_place", "resume": "abort"}  # on_weight_update -> /pause_generation mode
WEIGHTS, KV_CACHE, CUDA_GRAPH = "weights", "kv_cache", "cuda_graph"  # SGLang's constants.py


def distributed_bodies(metas: list[dict[str, list]], group: str, version: int, mode: str) -> list[dict]:
    """The /update_weights_from_distributed calls of one push: one per bucket (one for all in "wait")."""
    calls = [metas] if mode == "wait" else [[m] for m in metas]
    bodies = []
    for i, call in enumerate(calls):
        last = i == len(calls) - 1
        bodies.append(
            {
                "names": [n for m in call for n in m["names"]],
                "dtypes": [d for m in call for d in m["dtypes"]],
                "shapes": [s for m in call for s in m["shapes"]],
                "group_name": group,
                # SGLang cannot flush its prefix cache while requests are running (paused in place)
                "flush_cache": last and mode != "continue",
                "weight_version": str(version) if last else None,
            }
        )
    return bodies


@dataclass(frozen=True)
class PushInFlight:
    """A disaggregated push that has been submitted: `applied` resolve to each server's reported
    version once it holds the push, `sent` once the sender has broadcast each bucket."""

    applied: list[Any]
    sent: list[Any]


class SglangWeightSync:
    """Driver-side: pushes weights from `sender` (learner rank 0, or a WeightSender actor: both
    have WeightSender's methods) to the server actors."""

    def __init__(
        self,
        servers: list[Any],
        tp_sizes: list[int],
        sender: Any,
        *,
        backend: str = "nccl",
        keep_host_copy: bool = False,
    ) -> None:
        """keep_host_copy: colocated pushes leave a host copy on the sender for restarted servers."""
        self.servers, self.tp_sizes, self.sender, self.backend = servers, tp_sizes, sender, backend
        self.keep_host_copy = keep_host_copy
        self.group_name: str | None = None
        self._incarnations: list[int] | None = None
        self._groups = 0
        self.released = False

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

    def start_push(self, buckets: list[Any], version: int, mode: str) -> PushInFlight:
        """Submit the push of `buckets` (ObjectRefs of HF-named dicts, in order) as `version` and return
        without waiting for it (only a new weight-update group, when one is needed, is formed first)."""
        group = self._form_group()
        metas = [self.sender.describe_bucket.remote(b) for b in buckets]
        applied = [
            s.apply_distributed.remote(group, metas, list(buckets), version, mode) for s in self.servers
        ]
        sent = [self.sender.broadcast_bucket.remote(group, b) for b in buckets]
        return PushInFlight(applied, sent)

    @staticmethod
    def wait_sent(push: PushInFlight) -> None:
        """Until the sender has sent every bucket; a server whose update fails meanwhile raises here."""
        pending = list(push.sent) + list(push.applied)
        sent = set(push.sent)
        while sent & set(pending):
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)  # a failed server update (or send) raises its error

    def push(self, buckets: list[Any], version: int, mode: str) -> list[int]:
        """start_push, waited for: the versions the servers report afterwards."""
        return ray.get(self.start_push(buckets, version, mode).applied)

    def versions(self) -> list[int]:
        infos = ray.get([s.call.remote("GET", "/model_info") for s in self.servers])
        return [int(info["weight_version"]) for info in infos]

    # --- colocated ----------------------------------------------------------------------------------

    def release(self) -> None:
        """Before training on the shared GPUs: generation stops (whatever runs is aborted, new requests
        wait) and the servers free their weights, KV cache and CUDA graphs."""
        self._all("/pause_generation", {"mode": "abort"})
        self._all("/release_memory_occupation", {"tags": [KV_CACHE, WEIGHTS, CUDA_GRAPH]})
        self.released = True

    def push_tensors(self, payloads: list[str], version: int, loaded: Any = None) -> list[int]:
        """After training: the weights back in (per bucket, `payloads`: serialized named tensors on the
        sender's device), `loaded()` once every server has them (the sender may then free its copy), the
        KV cache and CUDA graphs back, generation continued; returns the versions the servers report.
        On servers that were not released (the first push of a resumed run) only the weights load."""
        if self.released:
            self._all("/resume_memory_occupation", {"tags": [WEIGHTS]})
        for i, payload in enumerate(payloads):
            last = i == len(payloads) - 1
            answers = ray.get(
                [
                    s.call.remote(
                        "POST",
                        "/update_weights_from_tensor",
                        {
                            "serialized_named_tensors": [payload] * tp,
                            "flush_cache": last,
                            "weight_version": str(version) if last else None,
                        },
                    )
                    for s, tp in zip(self.servers, self.tp_sizes, strict=True)
                ]
            )
            for answer in answers:
                if not answer.get("success"):
                    raise EngineError(f"/update_weights_from_tensor failed: {answer.get('message')}")
        if loaded is not None:
            loaded()
        if self.released:
            self._all("/resume_memory_occupation", {"tags": [KV_CACHE, CUDA_GRAPH]})
            self._all("/continue_generation", {})
            self.released = False
        return self.versions()

    def push_colocated(self, learner: Any, version: int, max_bytes: int) -> list[int]:
        """The colocated push from a LearnerGroup: every rank exports, rank 0 serializes its buckets
        (and, when servers may be restarted, keeps a host copy that they reload from), push_tensors,
        rank 0 drops its device copy once the servers have loaded it. Returns the reported versions."""
        payloads = learner.export_tensor_payloads(max_bytes, version, self.keep_host_copy)
        versions = self.push_tensors(payloads, version, learner.drop_tensor_payloads)
        if self.keep_host_copy:
            held = [LearnerHeld(learner.workers[0], version)]
            ray.get([s.set_current.remote(held, version) for s in self.servers])
        return versions
