"""Evaluation: the pass@k estimator, the [eval] sampling overrides as the engine receives them, and the
config errors of [eval]."""

from __future__ import annotations

import asyncio
import itertools
from fractions import Fraction
from math import comb

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from engine.errors import ConfigError
from engine.rollout.config import EvalConfig, InferenceConfig, RolloutConfig
from engine.rollout.data import Prompt
from engine.rollout.engines import EmbeddedEngineActor, InferenceEngine
from engine.rollout.eval_metrics import eval_set_metrics, mean_pass_at_k, pass_at_k
from engine.rollout.producer import Producer
from engine.wire import GenerateRequest, GenerateResult
from tests.helpers import prompt_ids


def brute_force(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_enumeration_over_all_subsets(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12), (n, c, k)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 7).flatmap(
        lambda n: st.lists(st.lists(st.booleans(), min_size=n, max_size=n), min_size=1, max_size=6)
    )
)
def test_eval_set_metrics_match_enumeration(correct: list[list[bool]]) -> None:
    n = len(correct[0])
    rewards = [[1.0 if ok else 0.0 for ok in prompt] for prompt in correct]
    metrics = eval_set_metrics("d", rewards)
    counts = [sum(prompt) for prompt in correct]
    for k in range(1, n + 1):
        expected = sum(brute_force(n, c, k) for c in counts) / len(counts)
        assert metrics[f"eval/d/pass@{k}"] == pytest.approx(expected, abs=1e-12)
    assert f"eval/d/pass@{n + 1}" not in metrics
    assert metrics["eval/d/pass@1"] == pytest.approx(metrics["eval/d/accuracy"], abs=1e-12)
    values = [metrics[f"eval/d/pass@{k}"] for k in range(1, n + 1)]
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(values))


def test_pass_at_k_edge_cases() -> None:
    for n in (1, 2, 5, 64):
        for k in range(1, n + 1):
            assert pass_at_k(n, 0, k) == 0.0  # no correct sample: never
            assert pass_at_k(n, n, k) == 1.0  # all correct: always
        assert pass_at_k(n, 1, n) == 1.0  # k = n: every sample drawn, one correct is enough
        assert pass_at_k(n, 1, 1) == pytest.approx(1 / n)
    for bad in ((4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 4)
    with pytest.raises(ValueError):
        eval_set_metrics("d", [[1.0, 0.0], [1.0]])


def test_pass_at_k_is_stable_for_large_n() -> None:
    """The product form agrees with exact rational arithmetic where the binomials are astronomically
    large (C(1000, 500) has 300 digits)."""
    for n, c, k in ((1000, 1, 1), (1000, 3, 500), (1000, 500, 10), (1000, 999, 1), (200, 7, 100)):
        exact = 1 - Fraction(comb(n - c, k), comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    assert pass_at_k(1000, 500, 501) == 1.0


def test_reward_and_accuracy_count_positive_rewards_as_correct() -> None:
    metrics = eval_set_metrics("math", [[1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    assert metrics["eval/math/reward"] == pytest.approx(0.5 / 8)
    assert metrics["eval/math/accuracy"] == pytest.approx(2 / 8)
    assert metrics["eval/math/pass@4"] == pytest.approx(0.5)  # the first prompt always, the second never


# --- [eval] sampling overrides, as the engine receives them ---------------------------------------

LENGTH = 24


class Recorder(InferenceEngine):
    """An in-process EmbeddedEngineActor that keeps every request it is sent."""

    def __init__(self, actor: EmbeddedEngineActor) -> None:
        self.actor, self.requests = actor, []

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        self.requests += requests
        return await self.actor.generate(requests)

    async def abort(self, rids: list[int]) -> None:
        await self.actor.abort(rids)


class Texts:
    """A reward that keeps each prompt's responses; a response is correct when its first character has an
    even code point (about half of them for the random tiny model)."""

    def __init__(self) -> None:
        self.texts: dict[str, list[str]] = {}

    async def score(
        self, responses: list[str], label: str | None, metadata: dict, prompt: str | None = None
    ) -> list[float]:
        self.texts[label] = responses
        return [float(bool(t) and ord(t[0]) % 2 == 0) for t in responses]


def evaluate(tiny_ckpt, evaluation: EvalConfig) -> tuple[dict, list[GenerateRequest], dict[str, list[str]]]:
    rollout = RolloutConfig(
        prompt_data="-", batch_size=1, num_rollout=1, max_response_len=LENGTH, temperature=1.0, top_p=1.0
    )
    prompts = [
        Prompt(index=i, token_ids=prompt_ids(tiny_ckpt, q), text=q, label=q, metadata={})
        for i, q in enumerate(["1+2", "12+34", "5+67", "80+9", "3+3", "41+41"])
    ]

    async def scenario():
        engine = Recorder(EmbeddedEngineActor(str(tiny_ckpt), InferenceConfig(batch_wait_ms=0.0), 0, 1, {}))
        rewards = Texts()
        producer = Producer(
            rollout,
            evaluation,
            tokenizer=AutoTokenizer.from_pretrained(tiny_ckpt),
            prompts=prompts,
            eval_sets={"toy": prompts},
            engines=[engine],
            sink=None,  # type: ignore[arg-type]
            rewards=rewards,  # type: ignore[arg-type]
            num_batches=1,
        )
        return await producer.evaluate("toy"), engine.requests, rewards.texts

    return asyncio.run(scenario())


def test_eval_overrides_reach_the_engine(tiny_ckpt) -> None:
    """max_response_len 2 caps every response at 2 tokens; temperature 0 makes the 4 samples of a prompt
    identical (so pass@k is the same for every k); top_p and top_k travel with each request."""
    evaluation = EvalConfig(
        n_samples_per_eval_prompt=4, max_response_len=2, temperature=0.0, top_p=0.9, top_k=5
    )
    metrics, requests, texts = evaluate(tiny_ckpt, evaluation)
    assert len(requests) == 6 * 4
    assert {
        (q.params.max_new_tokens, q.params.temperature, q.params.top_p, q.params.top_k) for q in requests
    } == {(2, 0.0, 0.9, 5)}
    assert 0 < metrics["eval/toy/response_len"] <= 2 and metrics["eval/toy/samples"] == 24
    assert all(len(set(responses)) == 1 for responses in texts.values()), texts
    assert {metrics[f"eval/toy/pass@{k}"] for k in range(1, 5)} == {metrics["eval/toy/accuracy"]}


def test_unset_eval_sampling_keys_fall_back_to_rollout(tiny_ckpt) -> None:
    metrics, requests, texts = evaluate(tiny_ckpt, EvalConfig(n_samples_per_eval_prompt=4))
    assert {
        (q.params.max_new_tokens, q.params.temperature, q.params.top_p, q.params.top_k) for q in requests
    } == {(LENGTH, 1.0, 1.0, -1)}
    assert metrics["eval/toy/response_len"] > 2
    assert any(len(set(responses)) > 1 for responses in texts.values())  # temperature 1: samples differ
    correct = [sum(bool(t) and ord(t[0]) % 2 == 0 for t in responses) for responses in texts.values()]
    for k in range(1, 5):
        expected = sum(brute_force(4, c, k) for c in correct) / len(correct)
        assert metrics[f"eval/toy/pass@{k}"] == pytest.approx(expected, abs=1e-12)
    assert metrics["eval/toy/pass@1"] == pytest.approx(metrics["eval/toy/accuracy"], abs=1e-12)


# --- config errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("n_samples_per_eval_prompt", 0, "must be > 0"),
        ("interval", -1, "must be >= 0"),
        ("max_response_len", 0, "must be > 0"),
        ("temperature", -0.5, "must be >= 0"),
        ("top_p", 0.0, "must be in (0, 1]"),
        ("top_k", 0, "must be -1 (off) or > 0"),
    ],
)
def test_bad_eval_values_name_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        EvalConfig(datasets={"d": "d.jsonl"}, **{key: value}).check()
    assert e.value.section == "eval" and e.value.key == key and message in str(e.value)


def test_missing_eval_dataset_is_reported_with_its_name_before_start(tmp_path) -> None:
    from engine.launch import prepare
    from tests.test_launch import QUICKSTART

    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError) as e:
        prepare(str(QUICKSTART), [f"eval.datasets={{held = '{missing}'}}"])
    assert f"[eval] datasets.held: '{missing}' does not exist" in str(e.value)
    with pytest.raises(ConfigError) as e:
        prepare(str(QUICKSTART), ["eval.datasets.extra=builtin:arithmetic/nope.jsonl"])
    assert "[eval] datasets.extra: 'builtin:arithmetic/nope.jsonl'" in str(e.value)
