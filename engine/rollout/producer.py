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
from collections.abc import Awaitable, Coroutine, Iterable
from typing import Any, NamedTuple, TypeVar

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
T = TypeVar("T")
TRAIN, EVAL = 1, 2  # seed domains


class Response(NamedTuple):
    result: GenerateResult
    text: str
    reward: float


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

    async def _respond(self, prompt: Prompt, params: SamplingParams, seeds: list[int]) -> list[Response]:
        """Generate one response per seed and score each one (rewards run concurrently)."""
        results = await self._generate(self._requests(prompt, params, seeds))
        texts = [self.tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in results]
        rewards = await gather_all(self.rewards.score(t, prompt.label, prompt.metadata) for t in texts)
        return [Response(r, t, w) for r, t, w in zip(results, texts, rewards, strict=True)]

    async def run(self, total_groups: int) -> dict[str, int]:
        """Start groups as capacity allows until total_groups have been sent; raise on any failure."""
        try:
            async with asyncio.TaskGroup() as tasks:
                while self.started_groups < total_groups:
                    await self._wait_for_capacity()
                    self.started_groups += 1
                    position, index = self.order.next()
                    tasks.create_task(self._run_group(position, self.prompts[index]))
        except ExceptionGroup as eg:
            raise eg.exceptions[0] from eg
        return {"groups": self.started_groups, "samples": self.sent_samples}

    async def _run_group(self, group_id: int, prompt: Prompt) -> None:
        """One group (group_id = the prompt's position in the prompt stream): generate, score, send."""
        n = self.cfg.n_samples_per_prompt
        async with self._group_slots:
            seeds = [derive_seed(self.cfg.seed, TRAIN, group_id, i) for i in range(n)]
            responses = await self._respond(prompt, self.train_params, seeds)
        for i, resp in enumerate(responses):
            await self.sink.send(self._sample(group_id, i, n, prompt, resp))
            self.sent_samples += 1

    def _sample(self, group_id: int, index: int, n: int, prompt: Prompt, resp: Response) -> Sample:
        r = resp.result
        return Sample.build(
            prompt_ids=prompt.token_ids,
            response_ids=r.token_ids,
            rollout_logprobs=r.logprobs,
            versions=r.versions,
            group_id=group_id,
            index=index,
            group_size=n,
            prompt_index=prompt.index,
            reward=resp.reward,
            status=STATUS[r.finish_reason],
            label=prompt.label,
            metadata=prompt.metadata,
            response_text=resp.text,
        )

    # --- evaluation ---------------------------------------------------------------------------------

    async def evaluate(self, name: str) -> dict[str, float]:
        """Mean reward, accuracy (share of positive rewards), length and truncation on one eval set."""
        prompts = self.eval_sets[name]
        n = self.eval_cfg.n_samples_per_eval_prompt
        slots = asyncio.Semaphore(max(1, self.cfg.max_concurrency // n))

        async def one(prompt: Prompt) -> list[Response]:
            # The same seeds at every evaluation: differences between evaluations come from the policy.
            seeds = [derive_seed(self.cfg.seed, EVAL, prompt.index, i) for i in range(n)]
            async with slots:
                return await self._respond(prompt, self.eval_params, seeds)

        start = time.perf_counter()
        responses = [r for group in await gather_all(one(p) for p in prompts) for r in group]
        rewards = np.array([r.reward for r in responses])
        return {
            f"eval/{name}/reward": float(rewards.mean()),
            f"eval/{name}/accuracy": float((rewards > 0).mean()),
            f"eval/{name}/response_len": float(np.mean([len(r.result.token_ids) for r in responses])),
            f"eval/{name}/truncated_frac": float(
                np.mean([r.result.finish_reason == "length" for r in responses])
            ),
            f"eval/{name}/samples": float(len(responses)),
            f"eval/{name}/time": time.perf_counter() - start,
        }


async def gather_all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Results in order; on the first failure the others are cancelled and that failure is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except ExceptionGroup as eg:
        raise eg.exceptions[0] from eg
    return [t.result() for t in tasks]


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
