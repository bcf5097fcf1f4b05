"""The producer's Ray actor: a Producer on a uvloop event loop in a thread of its own.

Ray calls (run, set_version, snapshot, evaluate, stats) are handed to that loop and block the calling
actor thread until done, so the actor must be threaded (max_concurrency >= 4): run() lasts the whole
training while the controller keeps calling the others. A snapshot runs between two steps of that loop,
so it sees every group in one state (engine/rollout/progress.py); `set_version` can return one taken
at the version boundary, which is where a producer restarted after a failure starts from. Engines are
reached through EngineGuards (engine/rollout/engine_guard.py), which survive engine restarts with the
weights of the last `set_version`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import uvloop

from engine.rollout.config import EvalConfig, InferenceConfig, RolloutConfig
from engine.rollout.data import Prompt
from engine.rollout.engine_guard import EngineGuard
from engine.rollout.engines import InferenceEngine
from engine.rollout.producer import Producer
from engine.rollout.progress import RayPartialStore, decode_state, encode_state
from engine.rollout.rewards import RewardPool
from engine.rollout.sglang.launch import SglangEndpoint
from engine.transport import TransportConfig, ZmqSampleSink

RID_STRIDE = 1 << 40  # request ids of producer incarnation i start at i x RID_STRIDE


class ProducerActor:
    """Ray actor wrapping one Producer."""

    def __init__(
        self,
        rollout: RolloutConfig,
        evaluation: EvalConfig,
        tokenizer_path: str,
        prompts: list[Prompt],
        eval_sets: dict[str, list[Prompt]],
        engines: list[Any],
        buffer: Any,
        buffer_address: str,
        num_batches: int,
        resume: bytes | None = None,
        *,
        transport: TransportConfig | None = None,
        inference: InferenceConfig | None = None,
        incarnation: int = 0,
        weights: tuple[int, list[Any] | None] = (0, None),
    ) -> None:
        from transformers import AutoTokenizer

        inference = inference or InferenceConfig()
        self._weights = weights  # the last push: (version, weight buckets), for restarted engines
        self.fault_counts: Counter[str] = Counter()
        self._guards: list[EngineGuard] = []

        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="producer-loop", daemon=True)
        self._thread.start()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self._rewards = RewardPool.from_config(rollout)

        async def build() -> Producer:
            sink = ZmqSampleSink(buffer_address, transport)
            partials = RayPartialStore(sink, buffer) if rollout.partial_rollout else None
            clients: list[InferenceEngine] = [
                e.client()
                if isinstance(e, SglangEndpoint)
                else EngineGuard(
                    e,
                    i,
                    lambda: self._weights,
                    stall_timeout_s=inference.stall_timeout_s,
                    max_restarts=inference.max_restarts,
                    counts=self.fault_counts,
                )
                for i, e in enumerate(engines)
            ]
            self._guards = [c for c in clients if isinstance(c, EngineGuard)]
            return Producer(
                rollout,
                evaluation,
                tokenizer,
                prompts,
                eval_sets,
                clients,
                sink,
                self._rewards,
                num_batches=num_batches,
                partials=partials,
                resume=None if resume is None else decode_state(resume),
                rid_start=incarnation * RID_STRIDE,
            )

        self.producer: Producer = self._call(build())

    def _call(self, coro: Coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def num_prompts(self) -> int:
        return len(self.producer.prompts)

    def pid(self) -> int:
        return os.getpid()

    def run(self) -> dict[str, int]:
        return {**self._call(self.producer.run()), **self.fault_counts}

    def set_version(
        self, version: int, *applied: int, weights: list[Any] | None = None, snapshot: bool = False
    ) -> bytes | None:
        """The engines hold `version` (`applied`: their acknowledgements, resolved by Ray first; `weights`:
        that push's buckets, kept for engines restarted later). With `snapshot`, returns the state at
        this boundary (an encoded RolloutState)."""
        if any(v != version for v in applied):
            raise RuntimeError(f"engines report versions {applied}, expected {version}")
        if weights is not None:
            self._weights = (version, weights)

        async def advance() -> bytes | None:
            await self.producer.set_version(version)
            return encode_state(self.producer.snapshot(version)) if snapshot else None

        return self._call(advance())

    def snapshot(self, version: int) -> bytes:
        """The producer's part of a checkpoint at `version` (an encoded RolloutState)."""

        async def take() -> bytes:
            return encode_state(self.producer.snapshot(version))

        return self._call(take())

    def evaluate(self, name: str) -> dict[str, float]:
        return self._call(self.producer.evaluate(name))

    def engine_calls_in_flight(self) -> list[int]:
        """Generate calls each embedded engine's guard is waiting on now."""
        return [guard.in_flight for guard in self._guards]

    def stats(self) -> dict[str, float]:
        async def read() -> dict[str, float]:
            faults = {f"producer/{k}": float(v) for k, v in self.fault_counts.items()}
            return {**self.producer.stats(), **faults}

        return self._call(read())

    def close(self) -> None:
        async def close_sink() -> None:
            self.producer.sink.close()

        self._call(close_sink())
        self._rewards.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
