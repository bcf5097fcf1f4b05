"""Weight pushes from the learner to the inference engines (embedded engines or SGLang servers), one
version at a time, and the producer told of each.

Guarantees:
- the producer learns version v only once every engine or server holds it: its set_version takes their
  acknowledgements (ObjectRefs of the version each holds) as arguments, so Ray runs it only once all of
  them are in, and the producer never admits work for a version the engines do not have yet;
- one push in flight: before a push's weights go out, the previous push has reached the producer (the
  controller's `settle` waits on `wait`, and replaces a producer that died meanwhile);
- the producer told is always the current one (`producer` is asked at each push); while its restart is
  due (it is None) the push is complete once the engines hold it, and the restarted producer starts
  at that version with `weights`, the last push's weights (for engines Ray restarts later).

The path is chosen once, at construction (engine/gpu_plan.weight_transfer for embedded engines):
- "cuda_ipc" (learner rank 0 and every engine on one GPU): rank 0's buckets stay on its GPU and travel
  as CUDA IPC handles (engine/cuda_ipc.py);
- "broadcast" (all on GPUs; gloo on the CPU): one broadcast per bucket from rank 0 in a process group
  with the engines (engine/weight_broadcast.py); rank 0 keeps the weights for engines restarted later;
- "object_store": rank 0's HF-named buckets of at most inference.update_weight_buffer_size bytes
  through Ray's object store;
- "sglang": the SGLang servers (engine/rollout/sglang/weight_sync.py). Disaggregated, learner rank 0
  broadcasts to the servers while they apply the update; `wait_sent` returns once it has sent everything
  and must be called before the learner trains again. Colocated (max_staleness = 0: nothing generates
  meanwhile) the servers release their memory before training (`release_servers`) and a push loads the
  learner's tensors into them, done when `push` returns.
On the embedded paths and disaggregated SGLang only the export blocks: the engines load the weights
while the learner goes on with the next batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError

from engine.config import Config
from engine.gpu_plan import weight_transfer
from engine.learner.group import LearnerGroup
from engine.weight_broadcast import BroadcastPush


class WeightPusher:
    """Pushes learner rank 0's weights as successive versions; holds the push in flight.

    producer: the producer to tell of a version (ProducerActor), or None while its restart is due;
    settle: called before a push's weights go out, returns once the previous push has reached the
    producer (the controller's wait on `wait`, with its restart of a dead producer).
    """

    def __init__(
        self,
        cfg: Config,
        learner: LearnerGroup,
        engines: list[Any],
        servers: list[Any],
        *,
        producer: Callable[[], Any | None],
        settle: Callable[[], None],
    ) -> None:
        self.cfg, self.learner, self.engines = cfg, learner, engines
        self._producer, self._settle = producer, settle
        self._pushed: Any = []  # the last push's completion (an ObjectRef once a push told a producer)
        self._applied: list[Any] = []  # the engines' acknowledgements of the last push
        self.weights: list[Any] | None = None  # the last push's weight buckets
        self._sending: Any = None  # an SGLang push whose broadcast learner rank 0 may still be sending
        self.weight_sync: Any = None
        self.broadcast: BroadcastPush | None = None
        c = cfg.inference
        if c.backend == "sglang":
            from engine.rollout.sglang.weight_sync import SglangWeightSync

            self.weight_sync = SglangWeightSync(
                servers,
                [c.num_gpus_per_engine] * len(servers),
                learner.workers[0],
                backend="gloo" if c.sglang.get("device") == "cpu" else "nccl",
                keep_host_copy=c.max_server_restarts > 0,
            )
        # CUDA IPC on a shared GPU, NCCL broadcast between GPUs, else the object store (engine/gpu_plan.py)
        self.transfer = weight_transfer(cfg, learner.info[0], engines) if engines else "sglang"
        if self.transfer == "broadcast":
            backend = "gloo" if learner.info[0]["device"] == "cpu" else "nccl"
            self.broadcast = BroadcastPush(learner, engines, c.update_weight_buffer_size, backend)

    def wait(self) -> bytes | None:
        """Until the last push has reached the producer: the rollout state it returned at that version
        boundary (None when no producer was told: then until every engine holds it). Raises the
        producer's error, RayActorError if it died."""
        result = ray.get(self._pushed)
        return None if isinstance(self._pushed, list) else result

    def without_producer(self) -> bytes | None:
        """After the producer died: until every engine holds the last push (one Ray restarts through
        retries); the state the producer returned for it if it did before it died, else None. The push
        then counts as reached (the restarted producer starts at its version)."""
        ray.get(self._applied)
        state = None
        if not isinstance(self._pushed, list):
            with contextlib.suppress(RayActorError):
                state = ray.get(self._pushed)
        self._pushed = self._applied
        return state

    def push(self, version: int) -> None:
        """Learner rank 0 -> every engine, then the producer learns the version (module docstring)."""
        size = self.cfg.inference.update_weight_buffer_size
        mode = self.cfg.rollout.on_weight_update
        if self.transfer == "sglang":
            self._push_sglang(version, size, mode)
            return
        if self.transfer == "broadcast":  # learner rank 0 holds the weights for engines restarted later
            assert self.broadcast is not None
            self._settle()
            self._applied, held = self.broadcast.push(version, mode)
            weights: Any = [held]
        else:
            if self.transfer == "cuda_ipc":
                weights = self.learner.export_shared_buckets(size)
            else:
                weights = self.learner.export_weight_buckets(size)
            self._settle()
            # retried on an engine Ray restarts meanwhile; a repeated update of one version is a no-op
            update = [e.update_weights.options(max_task_retries=-1) for e in self.engines]
            self._applied = [u.remote(weights, version, mode) for u in update]
        self.weights = weights
        producer = self._producer()
        if producer is not None:
            self._pushed = producer.set_version.remote(
                version,
                *self._applied,
                weights=weights,
                snapshot=self.cfg.rollout.max_producer_restarts > 0,
            )
        else:
            self._pushed = self._applied

    def _push_sglang(self, version: int, size: int, mode: str) -> None:
        """push for SGLang servers. Disaggregated, only the export blocks, as on the embedded paths;
        learner rank 0 takes part in the broadcast, which `wait_sent` waits for before it trains again.
        Colocated the push is done when this returns."""
        self._settle()
        if self.cfg.inference.colocate:
            acks: list[Any] = self.weight_sync.push_colocated(self.learner, version, size)
            self._applied = []
        else:
            buckets = ray.get(self.learner.export_weight_buckets(size))
            self._sending = self.weight_sync.start_push(buckets, version, mode)
            acks = self._applied = self._sending.applied
        producer = self._producer()
        if producer is not None:
            snapshot = self.cfg.rollout.max_producer_restarts > 0
            self._pushed = producer.set_version.remote(version, *acks, snapshot=snapshot)
        else:
            self._pushed = self._applied

    def wait_sent(self) -> None:
        """Before the learner trains: until learner rank 0 has sent the last SGLang push (a server
        whose update fails meanwhile raises here); nothing to wait for on the other paths."""
        if self._sending is not None:
            self.weight_sync.wait_sent(self._sending)
            self._sending = None

    def release_servers(self) -> None:
        """Colocated, before training: SGLang servers stop generating and release their memory
        (SglangWeightSync.release); embedded engines sleep through their own calls."""
        if self.weight_sync is not None:
            self.weight_sync.release()
