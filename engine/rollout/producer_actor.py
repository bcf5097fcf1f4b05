"""The producer's Ray actor: a Producer on a uvloop event loop in a thread of its own.

Ray calls (run, set_version, snapshot, evaluate, stats) are handed to that loop and block the calling
actor thread until done, so the actor must be threaded (max_concurrency >= 4): run() lasts the whole
training while the controller keeps calling the others. A snapshot runs between two steps of that loop,
so it sees every group in one state (engine/rollout/progress.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

import uvloop

from engine.rollout.config import EvalConfig, RolloutConfig
from engine.rollout.data import Prompt
from engine.rollout.engines import InferenceEngine, RayEngineClient
from engine.rollout.producer import Producer
from engine.rollout.progress import RayPartialStore, decode_state, encode_state
from engine.rollout.rewards import RewardPool
from engine.rollout.sglang.launch import SglangEndpoint
from engine.transport import ZmqSampleSink


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
    ) -> None:
        from transformers import AutoTokenizer

        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="producer-loop", daemon=True)
        self._thread.start()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self._rewards = RewardPool.from_config(rollout)

        async def build() -> Producer:
            sink = ZmqSampleSink(buffer_address)
            partials = RayPartialStore(sink, buffer) if rollout.partial_rollout else None
            clients: list[InferenceEngine] = [
                e.client() if isinstance(e, SglangEndpoint) else RayEngineClient(e) for e in engines
            ]
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
            )

        self.producer: Producer = self._call(build())

    def _call(self, coro: Coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def num_prompts(self) -> int:
        return len(self.producer.prompts)

    def run(self) -> dict[str, int]:
        return self._call(self.producer.run())

    def set_version(self, version: int, *applied: int) -> None:
        """The engines hold `version` (`applied`: their acknowledgements, resolved by Ray first)."""
        if any(v != version for v in applied):
            raise RuntimeError(f"engines report versions {applied}, expected {version}")
        self._call(self.producer.set_version(version))

    def snapshot(self, version: int) -> bytes:
        """The producer's part of a checkpoint at `version` (an encoded RolloutState)."""

        async def take() -> bytes:
            return encode_state(self.producer.snapshot(version))

        return self._call(take())

    def evaluate(self, name: str) -> dict[str, float]:
        return self._call(self.producer.evaluate(name))

    def stats(self) -> dict[str, float]:
        async def read() -> dict[str, float]:
            return self.producer.stats()

        return self._call(read())

    def close(self) -> None:
        async def close_sink() -> None:
            self.producer.sink.close()

        self._call(close_sink())
        self._rewards.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
