"""Inference engines as the producer sees them, and the embedded engine's Ray actor.

`InferenceEngine` is the whole contract the producer relies on: submit requests, get results. The
embedded engine's actor batches whatever requests are waiting (up to inference.max_batch_size
sequences), runs them on one worker thread, and takes weight updates between batches, so a batch never
mixes two weight versions (partial versions arrive with in-flight updates in the asynchronous pipeline).
"""

from __future__ import annotations

import abc
import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from engine.rollout.config import InferenceConfig
from engine.rollout.hf_engine import HFEngine
from engine.wire import GenerateRequest, GenerateResult


class InferenceEngine(abc.ABC):
    """An engine the producer can submit generation requests to."""

    @abc.abstractmethod
    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Results in request order."""


class RayEngineClient(InferenceEngine):
    """Producer-side handle to an EmbeddedEngineActor."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        return await self.actor.generate.remote(requests)


class EmbeddedEngineActor:
    """Ray actor hosting one HFEngine (created with `ray.remote(EmbeddedEngineActor).options(...)`)."""

    def __init__(
        self, model_path: str, cfg: InferenceConfig, index: int, threads: int, overrides: dict[str, Any]
    ) -> None:
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.index = index
        self.engine = HFEngine(
            model_path,
            dtype=cfg.dtype,
            attn_implementation=cfg.attn_implementation,
            seed=index,
            overrides=overrides,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine{index}")
        self._pending: list[tuple[list[GenerateRequest], asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._runner: asyncio.Task | None = None

    def _start(self) -> None:
        if self._runner is None:
            self._wake = asyncio.Event()
            self._lock = asyncio.Lock()
            self._runner = asyncio.get_running_loop().create_task(self._run())
            self._runner.add_done_callback(self._runner_ended)

    def _runner_ended(self, task: asyncio.Task) -> None:
        """The batch loop never ends on its own: whatever stopped it fails every waiting request."""
        error = task.exception() if not task.cancelled() else asyncio.CancelledError()
        failure = RuntimeError(f"engine {self.index}: batch loop stopped: {error!r}")
        for _, future in self._pending:
            if not future.done():
                future.set_exception(failure)
        self._pending.clear()

    async def ready(self) -> int:
        self._start()
        return self.engine.version

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        self._start()
        assert self._wake is not None and self._runner is not None
        if self._runner.done():
            raise RuntimeError(f"engine {self.index}: batch loop is not running")
        future = asyncio.get_running_loop().create_future()
        self._pending.append((requests, future))
        self._wake.set()
        return await future

    async def update_weights(self, named: dict[str, torch.Tensor], version: int) -> int:
        """Replace all weights between batches; returns the new version."""
        self._start()
        assert self._lock is not None
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self.engine.load_weights, named, version
            )
        return self.engine.version

    def _take_batch(self) -> list[tuple[list[GenerateRequest], asyncio.Future]]:
        taken, size = [], 0
        while self._pending:
            n = len(self._pending[0][0])
            if taken and size + n > self.cfg.max_batch_size:
                break
            taken.append(self._pending.pop(0))
            size += n
        return taken

    async def _run(self) -> None:
        assert self._wake is not None and self._lock is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.cfg.batch_wait_ms > 0:
                await asyncio.sleep(self.cfg.batch_wait_ms / 1000)
            while self._pending:
                calls = self._take_batch()
                requests = [r for reqs, _ in calls for r in reqs]
                try:
                    async with self._lock:
                        results = await loop.run_in_executor(self._executor, self.engine.generate, requests)
                except Exception as e:  # delivered to every caller of this batch, not swallowed
                    for _, future in calls:
                        if not future.done():
                            future.set_exception(e)
                    continue
                start = 0
                for reqs, future in calls:
                    if not future.done():
                        future.set_result(results[start : start + len(reqs)])
                    start += len(reqs)
