"""Reward functions imported by path in tests (the custom reward and custom bad reward)."""


def length_reward(response: str, label: str | None, metadata: dict) -> float:
    return float(len(response)) + metadata.get("bonus", 0.0)


def nan_reward(response: str, label: str | None, metadata: dict) -> float:
    return float("nan")


def failing_reward(response: str, label: str | None, metadata: dict) -> float:
    raise ValueError("boom")
