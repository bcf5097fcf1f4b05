"""The rollout producer: prompts in, scored samples out over the sample stream.

It runs on uvloop in its own thread inside a Ray actor. Guarantees:
- admission control: a group starts only while capacity = (k + v + 1) x B - started > 0, where v is the
  policy version the engines hold, B the rollout batch size in groups and k the staleness bound (0 here:
  synchronous on-policy training, each batch generated entirely by the current policy);
- every started group sends exactly n_samples_per_prompt samples, each scored, in one piece per sample;
- any failure (engine, reward, socket) ends `run` with that error instead of being dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Coroutine
from typing import Any

import numpy as np
import uvloop
from transformers import AutoTokenizer

from engine.rollout.config import EvalConfig, RolloutConfig
from engine.rollout.data import Prompt, PromptOrder
from engine.rollout.engines import InferenceEngine, RayEngineClient
from engine.rollout.rewards import RewardPool
from engine.rollout.sampling import derive_seed
from engine.transport import SampleSink, ZmqSampleSink
from engine.wire import GenerateRequest, GenerateResult, Sample, SamplingParams

log = logging.getLogger(__name__)

STATUS = {"stop": "completed", "length": "truncated", "abort": "aborted"}
TRAIN, EVAL = 1, 2  # seed domains


class Producer:
    """The asyncio core; create and use it inside one event loop."""

    def __init__(
        self,
        rollout: RolloutConfig,
        evaluation: EvalConfig,
        tokenizer: Any,
        prompts: list[Prompt],
        eval_sets: dict[str, list[Prompt]],
        engines: list[InferenceEngine],
        sink: SampleSink,
        rewards: RewardPool,
        *,
        max_staleness: int = 0,
    ) -> None:
        self.cfg, self.eval_cfg = rollout, evaluation
        self.tokenizer = tokenizer
        self.prompts, self.eval_sets = prompts, eval_sets
        self.engines, self.sink, self.rewards = engines, sink, rewards
        self.max_staleness = max_staleness
        self.order = PromptOrder(len(self.prompts), shuffle=rollout.shuffle, seed=rollout.seed)
        stops = tuple(sorted({*rollout.stop_token_ids, tokenizer.eos_token_id} - {None}))
        self.train_params = SamplingParams(
            max_new_tokens=rollout.max_response_len,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            top_k=rollout.top_k,
            stop_token_ids=stops,
        )
        e = evaluation
        self.eval_params = SamplingParams(
            max_new_tokens=e.max_response_len or rollout.max_response_len,
            temperature=rollout.temperature if e.temperature is None else e.temperature,
            top_p=rollout.top_p if e.top_p is None else e.top_p,
            top_k=rollout.top_k if e.top_k is None else e.top_k,
            stop_token_ids=stops,
        )
        self.version = 0
        self.started_groups = 0
        self.sent_samples = 0
        self._version_changed = asyncio.Event()
        self._group_slots = asyncio.Semaphore(max(1, rollout.max_concurrency // rollout.n_samples_per_prompt))
        self._rids = itertools.count()
        self._in_flight = [0] * len(engines)

    # --- admission control --------------------------------------------------------------------------

    def capacity(self) -> int:
        return (self.max_staleness + self.version + 1) * self.cfg.batch_size - self.started_groups

    def set_version(self, version: int) -> None:
        self.version = version
        self._version_changed.set()

    async def _wait_for_capacity(self) -> None:
        while self.capacity() <= 0:
            self._version_changed.clear()
            await self._version_changed.wait()

    # --- generation ---------------------------------------------------------------------------------

    async def _generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        i = min(range(len(self.engines)), key=self._in_flight.__getitem__)
        self._in_flight[i] += len(requests)
        try:
            return await self.engines[i].generate(requests)
        finally:
            self._in_flight[i] -= len(requests)

    def _requests(self, prompt: Prompt, params: SamplingParams, seeds: list[int]) -> list[GenerateRequest]:
        return [
            GenerateRequest(rid=next(self._rids), prompt_ids=prompt.token_ids, params=params, seed=seed)
            for seed in seeds
        ]

    async def run(self, total_groups: int) -> dict[str, int]:
        """Start groups as capacity allows until total_groups have been sent; raise on any failure."""
        try:
            async with asyncio.TaskGroup() as tasks:
                while self.started_groups < total_groups:
                    await self._wait_for_capacity()
                    await self._group_slots.acquire()
                    group_id = self.started_groups
                    self.started_groups += 1
                    _, index = self.order.next()
                    tasks.create_task(self._run_group(group_id, self.prompts[index]))
        except ExceptionGroup as eg:
            raise eg.exceptions[0] from eg
        return {"groups": self.started_groups, "samples": self.sent_samples}

    async def _run_group(self, group_id: int, prompt: Prompt) -> None:
        try:
            n = self.cfg.n_samples_per_prompt
            seeds = [derive_seed(self.cfg.seed, TRAIN, group_id, i) for i in range(n)]
            results = await self._generate(self._requests(prompt, self.train_params, seeds))
            samples = await asyncio.gather(
                *(self._score(group_id, i, n, prompt, r) for i, r in enumerate(results))
            )
            for sample in samples:
                await self.sink.send(sample)
                self.sent_samples += 1
        finally:
            self._group_slots.release()

    async def _score(
        self, group_id: int, index: int, n: int, prompt: Prompt, result: GenerateResult
    ) -> Sample:
        text = self.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        reward = await self.rewards.score(text, prompt.label, prompt.metadata)
        return Sample.build(
            prompt_ids=prompt.token_ids,
            response_ids=result.token_ids,
            rollout_logprobs=result.logprobs,
            versions=result.versions,
            group_id=group_id,
            index=index,
            group_size=n,
            prompt_index=prompt.index,
            reward=reward,
            status=STATUS[result.finish_reason],
            label=prompt.label,
            metadata=prompt.metadata,
            response_text=text,
        )

    # --- evaluation ---------------------------------------------------------------------------------

    async def evaluate(self, name: str) -> dict[str, float]:
        """Mean reward, accuracy (share of positive rewards), length and truncation on one eval set."""
        prompts = self.eval_sets[name]
        n = self.eval_cfg.n_samples_per_eval_prompt
        slots = asyncio.Semaphore(max(1, self.cfg.max_concurrency // n))

        async def one(prompt: Prompt) -> list[tuple[float, int, str]]:
            # The same seeds at every evaluation: differences between evaluations come from the policy.
            seeds = [derive_seed(self.cfg.seed, EVAL, prompt.index, i) for i in range(n)]
            async with slots:
                results = await self._generate(self._requests(prompt, self.eval_params, seeds))
                texts = [self.tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in results]
                rewards = await asyncio.gather(
                    *(self.rewards.score(t, prompt.label, prompt.metadata) for t in texts)
                )
                return [
                    (rw, len(r.token_ids), r.finish_reason) for rw, r in zip(rewards, results, strict=True)
                ]

        start = time.perf_counter()
        rows = [row for rows in await asyncio.gather(*(one(p) for p in prompts)) for row in rows]
        rewards = np.array([r for r, _, _ in rows])
        return {
            f"eval/{name}/reward": float(rewards.mean()),
            f"eval/{name}/accuracy": float((rewards > 0).mean()),
            f"eval/{name}/response_len": float(np.mean([n for _, n, _ in rows])),
            f"eval/{name}/truncated_frac": float(np.mean([f == "length" for _, _, f in rows])),
            f"eval/{name}/samples": float(len(rows)),
            f"eval/{name}/time": time.perf_counter() - start,
        }


class ProducerActor:
    """Ray actor (threaded; max_concurrency >= 3) running a Producer on a uvloop event loop thread."""

    def __init__(
        self,
        rollout: RolloutConfig,
        evaluation: EvalConfig,
        tokenizer_path: str,
        prompts: list[Prompt],
        eval_sets: dict[str, list[Prompt]],
        engines: list[Any],
        buffer_address: str,
    ) -> None:
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="producer-loop", daemon=True)
        self._thread.start()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self._rewards = RewardPool(rollout.rm_type, rollout.custom_rm_path, rollout.reward_workers)

        async def build() -> Producer:
            clients: list[InferenceEngine] = [RayEngineClient(e) for e in engines]
            sink = ZmqSampleSink(buffer_address)
            return Producer(rollout, evaluation, tokenizer, prompts, eval_sets, clients, sink, self._rewards)

        self.producer: Producer = self._call(build())

    def _call(self, coro: Coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def num_prompts(self) -> int:
        return len(self.producer.prompts)

    def run(self, total_groups: int) -> dict[str, int]:
        return self._call(self.producer.run(total_groups))

    def set_version(self, version: int) -> None:
        self._loop.call_soon_threadsafe(self.producer.set_version, version)

    def evaluate(self, name: str) -> dict[str, float]:
        return self._call(self.producer.evaluate(name))

    def close(self) -> None:
        async def close_sink() -> None:
            self.producer.sink.close()

        self._call(close_sink())
        self._rewards.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
