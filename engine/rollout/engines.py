"""Inference engines as the producer sees them, and the embedded engine's Ray actor.

`InferenceEngine` is the whole contract the producer relies on: submit requests, get each result
when it finishes, abort requests. The embedded engine's actor batches the requests waiting when a
batch starts (up to inference.max_batch_size), decodes it step by step on one worker thread, and
hands each request's result back as soon as that request finishes. With the static-cache engine
(inference.engine_impl) waiting requests also join the running batch between steps, as slots free up.
Weight updates arrive between steps, in one of three modes:
- "wait": the running batch finishes with the old weights (no request joins it meanwhile); the update
  applies before the next batch;
- "continue": the update applies at once and the running batch goes on decoding (in-flight update);
  tokens drawn after it carry the new version;
- "resume": the running batch is aborted (its requests come back with their tokens so far and
  finish_reason "abort", for the producer to resume), then the update applies.
"""

from __future__ import annotations

import abc
import asyncio
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

import ray
import torch

from engine.cluster import gpu_memory, gpu_uuid, pin_to_core
from engine.cuda_ipc import SharedBucket
from engine.rollout.config import InferenceConfig
from engine.rollout.engine_choice import build_engine
from engine.rollout.hf_engine import DecodeBatch
from engine.weight_broadcast import LearnerHeld, receive_buckets
from engine.wire import GenerateRequest, GenerateResult

if TYPE_CHECKING:
    from engine.rollout.static_engine import SlotBatch

WeightMode = Literal["wait", "continue", "resume"]


class InferenceEngine(abc.ABC):
    """An engine the producer can submit generation requests to."""

    @abc.abstractmethod
    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Results in request order (each request finishes on its own; aborted ones say "abort")."""

    @abc.abstractmethod
    async def abort(self, rids: list[int]) -> None:
        """Stop these requests (waiting or running); their generate calls return what they have."""


class RayEngineClient(InferenceEngine):
    """Producer-side handle to an EmbeddedEngineActor.

    Requests submitted in the same turn of the event loop (a burst of newly admitted groups) travel as
    one Ray call, and each caller gets its own results back: one round trip instead of one per group.
    """

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self._queued: list[tuple[list[GenerateRequest], asyncio.Future]] = []
        self._sending: set[asyncio.Future] = set()

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((requests, future))
        return await future

    def _flush(self) -> None:
        calls, self._queued = self._queued, []
        task = asyncio.ensure_future(self._send(calls))
        self._sending.add(task)  # a reference until it is done, so it is not collected
        task.add_done_callback(self._sending.discard)

    async def _send(self, calls: list[tuple[list[GenerateRequest], asyncio.Future]]) -> None:
        try:
            results = await self.actor.generate.remote([r for requests, _ in calls for r in requests])
        except Exception as e:  # every caller of this round trip gets the error
            for _, future in calls:
                if not future.done():
                    future.set_exception(e)
            return
        start = 0
        for requests, future in calls:
            if not future.done():
                future.set_result(results[start : start + len(requests)])
            start += len(requests)

    async def abort(self, rids: list[int]) -> None:
        await self.actor.abort.remote(rids)


def aborted(request: GenerateRequest) -> GenerateResult:
    return GenerateResult(rid=request.rid, token_ids=[], logprobs=[], versions=[], finish_reason="abort")


class EmbeddedEngineActor:
    """Ray actor hosting one embedded engine (made with `ray.remote(EmbeddedEngineActor).options(...)`)."""

    def __init__(
        self,
        model_path: str,
        cfg: InferenceConfig,
        index: int,
        threads: int,
        overrides: dict[str, Any],
        core: int | None = None,
    ) -> None:
        pin_to_core(core)
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.index = index
        self.engine = build_engine(model_path, cfg, seed=index, overrides=overrides)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine{index}")
        self._pending: deque[tuple[GenerateRequest, asyncio.Future]] = deque()
        self._running: DecodeBatch | SlotBatch | None = None
        self._futures: dict[int, asyncio.Future] = {}
        self._aborts: set[int] = set()
        self._update: tuple[dict[str, torch.Tensor], int, WeightMode, asyncio.Future] | None = None
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self.busy_s = 0.0
        self.sleeps = 0
        self._weight_groups: dict[
            str, Any
        ] = {}  # broadcast weight groups joined (engine/weight_broadcast.py)
        self._awake = asyncio.Event()  # cleared while asleep (colocated mode: the learner trains)
        self._awake.set()
        self._idle = asyncio.Event()  # set whenever no batch is decoding
        self._idle.set()
        self.beats = 0  # decode steps, batch starts and updates done: progress seen by a watchdog
        self._loaded: int | None = None  # the version of the last update applied

    def _start(self) -> None:
        if self._runner is None:
            self._wake = asyncio.Event()
            self._runner = asyncio.get_running_loop().create_task(self._run())
            self._runner.add_done_callback(self._runner_ended)

    def _runner_ended(self, task: asyncio.Task) -> None:
        """The loop never ends on its own: whatever stopped it fails every waiting caller."""
        error = task.exception() if not task.cancelled() else asyncio.CancelledError()
        failure = RuntimeError(f"engine {self.index}: decode loop stopped: {error!r}")
        waiting = [f for _, f in self._pending] + list(self._futures.values())
        if self._update is not None:
            waiting.append(self._update[3])
        for future in waiting:
            if not future.done():
                future.set_exception(failure)
        self._pending.clear()
        self._futures.clear()

    def _check_running(self) -> asyncio.Event:
        self._start()
        assert self._wake is not None and self._runner is not None
        if self._runner.done():
            raise RuntimeError(f"engine {self.index}: decode loop is not running")
        return self._wake

    async def ready(self) -> int:
        self._check_running()
        return self.engine.version

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        wake = self._check_running()
        loop = asyncio.get_running_loop()
        futures = []
        for r in requests:
            future = loop.create_future()
            self._pending.append((r, future))
            futures.append(future)
        wake.set()
        return list(await asyncio.gather(*futures))

    async def abort(self, rids: list[int]) -> None:
        wake = self._check_running()
        self._aborts.update(rids)
        wake.set()

    async def abort_all(self) -> None:
        """Abort every waiting and running request (their callers are gone: a producer restarted)."""
        wake = self._check_running()
        self._aborts.update(r.rid for r, _ in self._pending)
        if self._running is not None:
            self._aborts.update(r.rid for r in self._running.requests)
        wake.set()

    async def heartbeat(self) -> int:
        """A count that grows while the engine makes progress (answered between decode steps)."""
        return self.beats

    async def pid(self) -> int:
        return os.getpid()

    async def update_weights(
        self, named: dict[str, torch.Tensor] | list[Any], version: int, mode: WeightMode = "wait"
    ) -> int:
        """Replace all weights (see the module docstring for the modes); returns the new version.

        `named` is the HF-named tensors, or their buckets (ObjectRefs of dicts, in order): buckets are
        fetched one at a time and the update applies only once the last one is here, so decoding never
        sees a mix of two versions. An update to the version last applied is a no-op (a restarted
        engine may be given its weights both by a retried push and by the producer's recovery)."""
        wake = self._check_running()
        if self._loaded == version:
            return self.engine.version
        if isinstance(named, list):
            staged: dict[str, torch.Tensor] = {}
            for bucket in named:
                if isinstance(bucket, LearnerHeld):  # a restarted engine: the broadcast push's weights
                    bucket = bucket.fetch()
                if isinstance(bucket, ray.ObjectRef):
                    bucket = await bucket
                # a CUDA IPC bucket maps the learner's GPU memory (engine/cuda_ipc.py): no host copy
                staged.update(bucket.open() if isinstance(bucket, SharedBucket) else bucket)
            named = staged
        while self._update is not None:  # the same update from another caller: wait for it first
            await asyncio.shield(self._update[3])
            if self._loaded == version:
                return self.engine.version
        future = asyncio.get_running_loop().create_future()
        self._update = (named, version, mode, future)
        wake.set()
        await future
        return self.engine.version

    async def join_weight_group(
        self, address: str, port: int, rank: int, world: int, name: str, backend: str
    ) -> None:
        """Join learner rank 0's weight group (engine/weight_broadcast.py) as `rank`."""
        from engine.rollout.sglang.weight_group import join_group

        self._weight_groups[name] = await asyncio.to_thread(
            join_group, address, port, rank, world, name, backend
        )

    async def leave_weight_group(self, name: str) -> None:
        group = self._weight_groups.pop(name, None)
        if group is not None:
            torch.distributed.destroy_process_group(group)

    async def receive_weights(self, name: str, layout: list[Any], version: int, mode: WeightMode) -> int:
        """Receive a broadcast push (every bucket, in order, off the event loop), then apply it as
        update_weights does."""
        group = self._weight_groups[name]
        named = await asyncio.to_thread(receive_buckets, group, layout, self.engine.device)
        return await self.update_weights(named, version, mode)

    async def sleep(self) -> None:
        """Colocated mode, before training: let the running batch finish, start no new one, and give the
        device memory that decoding alone needs back (HFEngine.release_memory) until wake."""
        self._check_running()
        self._awake.clear()
        self.sleeps += 1
        await self._idle.wait()
        await self._off_loop(self.engine.release_memory)

    async def wake(self) -> None:
        await self._off_loop(self.engine.resume_memory)
        self._awake.set()
        self._check_running().set()

    async def memory(self, reset: bool = False) -> dict[str, float]:
        """This engine's GPU memory (engine.cluster.gpu_memory; {} on the CPU)."""
        return gpu_memory(reset)

    async def state_dict(self) -> dict[str, torch.Tensor]:
        """A host copy of the engine's weights under its model's names."""
        return {name: t.cpu() for name, t in self.engine.state_dict().items()}

    async def gpu_uuid(self) -> str | None:
        """The physical GPU this engine runs on (None on the CPU)."""
        return gpu_uuid()

    async def stats(self) -> dict[str, float]:
        in_flight = len(self._pending) + len(self._futures)
        return {
            "version": self.engine.version,
            "busy_s": self.busy_s,
            "sleeps": self.sleeps,
            "in_flight": in_flight,
        }

    def _deliver(self, results: list[GenerateResult]) -> None:
        for result in results:
            future = self._futures.pop(result.rid, None)
            if future is not None and not future.done():
                future.set_result(result)

    def _apply_aborts(self) -> None:
        if not self._aborts:
            return
        kept: deque[tuple[GenerateRequest, asyncio.Future]] = deque()
        for request, future in self._pending:
            if request.rid in self._aborts:
                if not future.done():
                    future.set_result(aborted(request))
            else:
                kept.append((request, future))
        self._pending = kept
        if self._running is not None:
            self._deliver(self._running.abort(self._aborts))
        self._aborts.clear()

    async def _off_loop(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        finally:
            self.busy_s += loop.time() - start

    async def _join(self, running: SlotBatch) -> None:
        """Waiting requests join the running batch (static engine), as many as it has free slots."""
        take = min(len(self._pending), running.free_slots)
        batch = [self._pending.popleft() for _ in range(take)]
        self._futures.update({r.rid: f for r, f in batch})
        try:
            finished = await self._off_loop(running.join, [r for r, _ in batch])
        except Exception as e:  # delivered to every joining request, not swallowed
            for request, future in batch:
                self._futures.pop(request.rid, None)
                if not future.done():
                    future.set_exception(e)
            return
        self._deliver(finished)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            self._apply_aborts()
            if self._update is not None and (self._running is None or self._update[2] != "wait"):
                named, version, mode, future = self._update
                if self._running is not None and mode == "resume":
                    self._deliver(self._running.abort())
                    self._running = None
                try:
                    await self._off_loop(self.engine.load_weights, named, version)
                except Exception as e:  # a refused update goes back to its caller; decoding goes on
                    future.set_exception(e)
                else:
                    self._loaded = version
                    self.beats += 1
                    future.set_result(version)
                self._update = None
                continue
            if self._running is None:
                self._idle.set()
                if not self._awake.is_set():
                    await self._awake.wait()
                    continue
                if not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                    if self.cfg.batch_wait_ms > 0:
                        await asyncio.sleep(self.cfg.batch_wait_ms / 1000)
                    continue
                self._idle.clear()
                take = min(len(self._pending), self.cfg.max_batch_size)
                batch = [self._pending.popleft() for _ in range(take)]
                requests = [r for r, _ in batch]
                self._futures.update({r.rid: f for r, f in batch})
                self.beats += 1
                try:
                    self._running = await self._off_loop(self.engine.start, requests)
                except Exception as e:  # delivered to every request of the batch, not swallowed
                    for request, future in batch:
                        self._futures.pop(request.rid, None)
                        if not future.done():
                            future.set_exception(e)
                continue
            if self._pending and self._update is None and self._running.free_slots > 0:
                await self._join(self._running)  # type: ignore[arg-type]
                if self._running.done:
                    self._running = None
                continue
            try:
                finished = await self._off_loop(self._running.step)
            except Exception as e:
                for rid in [r.rid for r in self._running.requests]:
                    future = self._futures.pop(rid, None)
                    if future is not None and not future.done():
                        future.set_exception(e)
                self._running.abort()  # its rows are released (the static engine's slots too)
                self._running = None
                continue
            self.beats += 1
            self._deliver(finished)
            if self._running.done:
                self._running = None
