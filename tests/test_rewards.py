"""Rewards: math-verify, custom by import path, scored in worker processes, bad scores refused."""

from __future__ import annotations

import asyncio

import pytest

from engine.errors import ConfigError
from engine.rollout.rewards import RewardError, RewardPool, math_reward, resolve_reward


@pytest.mark.parametrize(
    "response, label, want",
    [
        ("85", "85", 1.0),
        ("84", "85", 0.0),
        ("the answer is 85", "85", 1.0),
        ("\\boxed{0.5}", "1/2", 1.0),
        ("", "85", 0.0),
        ("banana", "85", 0.0),
    ],
)
def test_math_reward(response: str, label: str, want: float) -> None:
    assert math_reward(response, label, {}) == want


@pytest.mark.parametrize("response", ["85", "085", " 85 ", "85.0", "84", "-85", "8.5", "850", "0"])
def test_plain_number_fast_path_agrees_with_math_verify(response: str) -> None:
    from math_verify import parse, verify

    assert math_reward(response, "85", {}) == float(verify(parse("85"), parse(response)))


def test_resolution_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"\[rollout\] rm_type: unknown reward 'nope' \(built-in: math\)"):
        resolve_reward("nope", None)
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_reward("math", "no_such_module:fn")
    with pytest.raises(ConfigError, match="has no attribute"):
        resolve_reward("math", "tests.rewards_custom:absent")
    assert resolve_reward("math", "tests.rewards_custom.length_reward")("abc", None, {}) == 3.0


def test_pool_scores_in_worker_processes() -> None:
    async def go(pool: RewardPool) -> list[list[float]]:
        return await asyncio.gather(pool.score(["12", "13", "x"], "12", {}), pool.score(["1"], "1", {}))

    pool = RewardPool("math", None, workers=2)
    try:
        assert asyncio.run(go(pool)) == [[1.0, 0.0, 0.0], [1.0]]
    finally:
        pool.close()
    custom = RewardPool("math", "tests.rewards_custom:length_reward", workers=1)
    try:
        assert asyncio.run(custom.score(["abcd", ""], None, {"bonus": 0.5})) == [4.5, 0.5]
    finally:
        custom.close()


@pytest.mark.parametrize(
    "path, message",
    [("tests.rewards_custom:nan_reward", "finite"), ("tests.rewards_custom:failing_reward", "boom")],
)
def test_bad_scores_are_errors(path: str, message: str) -> None:
    pool = RewardPool("math", path, workers=1)
    try:
        with pytest.raises(RewardError, match=message):
            asyncio.run(pool.score(["resp"], None, {}))
    finally:
        pool.close()
