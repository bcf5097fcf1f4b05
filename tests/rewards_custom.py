"""Reward functions imported by path in tests: per response and per group, sync and async, good and bad."""

import asyncio


def length_reward(response: str, label: str | None, metadata: dict) -> float:
    return float(len(response)) + metadata.get("bonus", 0.0)


def nan_reward(response: str, label: str | None, metadata: dict) -> float:
    return float("nan")


def failing_reward(response: str, label: str | None, metadata: dict) -> float:
    raise ValueError("boom")


def group_rank_reward(responses: list[str], label: str | None, metadata: dict) -> list[float]:
    """A group reward: 1.0 for the longest response(s) of the group, 0.0 for the others."""
    longest = max(len(r) for r in responses)
    return [float(len(r) == longest) for r in responses]


def short_group_reward(responses: list[str], label: str | None, metadata: dict) -> list[float]:
    return [1.0] * (len(responses) - 1)


async def async_length_reward(response: str, label: str | None, metadata: dict) -> float:
    await asyncio.sleep(0)
    return float(len(response)) + metadata.get("bonus", 0.0)


async def async_group_rank_reward(responses: list[str], label: str | None, metadata: dict) -> list[float]:
    await asyncio.sleep(0)
    return group_rank_reward(responses, label, metadata)


async def async_failing_reward(response: str, label: str | None, metadata: dict) -> float:
    raise ValueError("async boom")
