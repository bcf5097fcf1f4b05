"""Weights arriving during generation, and aborts: the embedded engine's actor and the producer's resume.

The actor class and the producer's decode loop run here directly in one asyncio loop (no Ray), so the
test decides when an update arrives: after the running batch has drawn a few tokens, never by a clock.
Requests use seeds whose responses are long (checked first), so a batch is always still running when
the update lands. Every test runs on both embedded engine implementations (inference.engine_impl).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoTokenizer

from engine.buffer.buffer import BufferActor
from engine.rollout.config import EvalConfig, InferenceConfig, RolloutConfig
from engine.rollout.data import Prompt
from engine.rollout.engine_choice import build_engine
from engine.rollout.engines import EmbeddedEngineActor, InferenceEngine
from engine.rollout.producer import Group, PartialStore, Producer, Response
from engine.rollout.rewards import RewardPool
from engine.transport import ZmqSampleSink
from engine.wire import GenerateRequest, GenerateResult, SamplingParams
from tests.helpers import prompt_ids

LENGTH = 40


class Local(InferenceEngine):
    """The producer's view of an EmbeddedEngineActor object living in this event loop."""

    def __init__(self, actor: EmbeddedEngineActor) -> None:
        self.actor = actor

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        return await self.actor.generate(requests)

    async def abort(self, rids: list[int]) -> None:
        await self.actor.abort(rids)


@pytest.fixture(scope="module", params=["transformers", "static"])
def impl(request) -> str:
    return request.param


def config(impl: str, **kw) -> InferenceConfig:
    return InferenceConfig(batch_wait_ms=0.0, engine_impl=impl, device="cpu", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def long_seeds(tiny_ckpt, impl):
    """Seeds whose responses run the whole budget without stopping, and those responses."""
    engine = build_engine(str(tiny_ckpt), config(impl), seed=0)
    ids = prompt_ids(tiny_ckpt, "12+34")
    params = SamplingParams(max_new_tokens=LENGTH)
    reqs = [GenerateRequest(rid=s, prompt_ids=ids, params=params, seed=s) for s in range(200)]
    full = {r.rid: r for r in engine.generate(reqs) if r.finish_reason == "length"}
    assert len(full) >= 3, "the tiny model should often run to the budget"
    return ids, dict(list(full.items())[:3])


def actor(tiny_ckpt, impl: str, **kw) -> EmbeddedEngineActor:
    return EmbeddedEngineActor(str(tiny_ckpt), config(impl, **kw), 0, 1, {})


async def until_running(a: EmbeddedEngineActor, steps: int = 3) -> None:
    while not (a._running is not None and a._running.steps >= steps):
        await asyncio.sleep(0.001)


def requests(ids, seeds) -> list[GenerateRequest]:
    return [
        GenerateRequest(rid=s, prompt_ids=ids, params=SamplingParams(max_new_tokens=LENGTH), seed=s)
        for s in seeds
    ]


def same_weights(a: EmbeddedEngineActor) -> dict[str, torch.Tensor]:
    return a.engine.state_dict()


def test_continue_keeps_decoding_and_later_tokens_carry_the_new_version(tiny_ckpt, long_seeds, impl) -> None:
    ids, full = long_seeds

    async def scenario() -> tuple[list[GenerateResult], int]:
        a = actor(tiny_ckpt, impl)
        task = asyncio.ensure_future(a.generate(requests(ids, full)))
        await until_running(a)
        version = await a.update_weights(same_weights(a), 1, "continue")
        return await task, version

    results, version = asyncio.run(scenario())
    assert version == 1
    for r in results:
        assert (
            r.finish_reason == "length" and r.token_ids == full[r.rid].token_ids
        )  # same weights: same tokens
        switch = r.versions.index(1)
        assert 3 <= switch < LENGTH and r.versions == [0] * switch + [1] * (LENGTH - switch)


def test_wait_finishes_the_batch_before_the_update(tiny_ckpt, long_seeds, impl) -> None:
    ids, full = long_seeds

    async def scenario() -> tuple[list[GenerateResult], EmbeddedEngineActor]:
        a = actor(tiny_ckpt, impl)
        task = asyncio.ensure_future(a.generate(requests(ids, full)))
        await until_running(a)
        update = asyncio.ensure_future(a.update_weights(same_weights(a), 1, "wait"))
        results = await task
        await update
        return results, a

    results, a = asyncio.run(scenario())
    assert all(r.versions == [0] * LENGTH for r in results) and a.engine.version == 1


def test_resume_aborts_and_the_producer_continues_with_prefix_intact(tiny_ckpt, long_seeds, impl) -> None:
    ids, full = long_seeds
    seed = next(iter(full))
    (reference,) = build_engine(str(tiny_ckpt), config(impl), seed=0).generate(
        requests(ids, [seed])
    )  # alone, as the producer sends it

    async def scenario() -> tuple[Response, list[GenerateResult]]:
        a = actor(tiny_ckpt, impl)
        prompt = Prompt(index=0, token_ids=ids, text="", label=None, metadata={})
        producer = Producer(
            RolloutConfig(prompt_data="-", batch_size=1, num_rollout=1, max_response_len=LENGTH),
            EvalConfig(),
            tokenizer=AutoTokenizer.from_pretrained(tiny_ckpt),
            prompts=[prompt],
            eval_sets={},
            engines=[Local(a)],
            sink=None,  # type: ignore[arg-type]
            rewards=None,  # type: ignore[arg-type]
            num_batches=1,
        )
        response = Response(seed=seed, budget=LENGTH)
        decode = asyncio.ensure_future(producer._decode(prompt, [response], producer.train_params))
        await until_running(a)
        await a.update_weights(same_weights(a), 1, "resume")
        await decode
        return response, producer.counts

    response, counts = asyncio.run(scenario())
    assert counts["inflight_resumes"] == 1
    switch = response.versions.index(1)
    assert 3 <= switch < LENGTH and response.versions == [0] * switch + [1] * (LENGTH - switch)
    # the tokens before the abort and their log-probs are exactly those first reported
    assert response.tokens[:switch] == reference.token_ids[:switch]
    assert response.logprobs[:switch] == reference.logprobs[:switch]
    # resumed from prompt + prefix with the same seed stream and the same weights: the same response
    assert response.tokens == reference.token_ids and response.finish == "length"
    assert response.logprobs == pytest.approx(reference.logprobs, abs=1e-5)


def test_abort_running_and_waiting_requests(tiny_ckpt, long_seeds, impl) -> None:
    ids, full = long_seeds
    running, waiting = list(full)[:2], [1000]

    async def scenario() -> tuple[list[GenerateResult], list[GenerateResult]]:
        a = actor(tiny_ckpt, impl, max_batch_size=2)
        first = asyncio.ensure_future(a.generate(requests(ids, running)))
        await until_running(a)
        second = asyncio.ensure_future(a.generate(requests(ids, waiting)))
        await asyncio.sleep(0)
        await a.abort([running[0], 1000])
        return await first, await second

    first, second = asyncio.run(scenario())
    cut, kept = first
    assert cut.finish_reason == "abort" and 3 <= len(cut.token_ids) < LENGTH
    assert cut.token_ids == full[running[0]].token_ids[: len(cut.token_ids)]
    assert kept.finish_reason == "length" and kept.token_ids == full[running[1]].token_ids
    assert second == [GenerateResult(rid=1000, token_ids=[], logprobs=[], versions=[], finish_reason="abort")]


@pytest.mark.parametrize("masked", [False, True])
def test_a_cached_partial_group_resumes_first_with_its_tokens(tiny_ckpt, long_seeds, impl, masked) -> None:
    """A group cut when its batch filled waits in the buffer; the next round resumes it before any new
    prompt, from prompt + its tokens, the cached tokens' log-probs and versions untouched (and masked
    out of the loss when mask_offpolicy_in_partial_rollout is on)."""
    ids, full = long_seeds
    seeds = list(full)[:2]
    cut = 3

    async def scenario() -> tuple[list, dict]:
        buffer = BufferActor(batch_size=1)
        rewards = RewardPool("math", "tests.rewards_custom:length_reward", workers=1)
        try:
            sink = ZmqSampleSink(buffer.address())
            prompt = Prompt(index=0, token_ids=ids, text="", label="46", metadata={})
            other = Prompt(index=1, token_ids=prompt_ids(tiny_ckpt, "1+1"), text="", label="2", metadata={})
            rollout = RolloutConfig(
                prompt_data="-",
                batch_size=1,
                n_samples_per_prompt=2,
                num_rollout=1,
                max_response_len=LENGTH,
                max_staleness=1,
                partial_rollout=True,
                mask_offpolicy_in_partial_rollout=masked,
                shuffle=False,
            )
            producer = Producer(
                rollout,
                EvalConfig(),
                AutoTokenizer.from_pretrained(tiny_ckpt),
                [other],
                {},
                [Local(actor(tiny_ckpt, impl))],
                sink,
                rewards,
                num_batches=1,
                partials=BufferPartials(sink, buffer),
            )
            cached = Group(
                prompt,
                [
                    Response(
                        seed=s,
                        budget=LENGTH,
                        tokens=full[s].token_ids[:cut],
                        logprobs=full[s].logprobs[:cut],
                        versions=[0] * cut,
                        mask=[1] * cut,
                    )
                    for s in seeds
                ],
                seq=99,
            )
            await producer._set_aside(cached)
            await producer.run()
            samples, _ = await asyncio.to_thread(buffer.get_batch, 0, 30)
            sink.close()
            return samples, producer.ledger()
        finally:
            rewards.close()
            buffer.close()

    samples, ledger = asyncio.run(scenario())
    assert ledger["partials_resumed"] == 1 and ledger["groups_started"] == 1  # resumed before any new prompt
    for x, s in zip(samples, seeds, strict=True):
        assert x.prompt_index == 0 and x.seed == s
        assert x.response_array.tolist() == full[s].token_ids  # the same seed stream, continued
        assert x.logprob_array[:cut].tolist() == pytest.approx(full[s].logprobs[:cut], abs=0)
        assert x.version_array.tolist() == [0] * LENGTH
        assert x.mask_array.tolist() == [0 if masked else 1] * cut + [1] * (LENGTH - cut)


class BufferPartials(PartialStore):
    """The partial cache of a BufferActor object living in this process."""

    def __init__(self, sink: ZmqSampleSink, buffer: BufferActor) -> None:
        super().__init__(sink)
        self.buffer = buffer

    async def take(self, n: int) -> list:
        return await asyncio.to_thread(self.buffer.take_partials, n, self.sent, 30)
