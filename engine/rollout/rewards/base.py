"""What every reward shares: the error type, the function shape, labels and the finite-score check.

Guarantee: `checked` returns a finite float or raises RewardError naming the reward and the response;
`labels_of` returns a non-empty list of gold answers or raises RewardError naming the reward.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from engine.errors import EngineError

RewardFn = Callable[[str, Any, dict], float]


class RewardError(EngineError):
    """A reward failed, was misconfigured for a sample, or returned something that is not a finite number."""


def labels_of(label: Any, reward: str) -> list[str]:
    """The gold answers of a label: a string, a list of strings, or a JSON list of strings (the form a
    list label takes after data loading, e.g. '["1/2", "0.5"]')."""
    if label is None:
        raise RewardError(f"the {reward} reward needs a label (set rollout.label_key)")
    if isinstance(label, list | tuple):
        items = list(label)
    elif isinstance(label, str) and label.lstrip().startswith("["):
        try:
            value = json.loads(label)
        except ValueError:
            value = None
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        items = value if ok else [label]
    else:
        items = [label]
    if not items:
        raise RewardError(f"the {reward} reward got an empty list of labels")
    return [str(x) for x in items]


def checked(value: Any, response: str, reward: str = "reward") -> float:
    """`value` as a finite float, else RewardError naming the reward and the response."""
    if isinstance(value, bool):
        value = float(value)
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise RewardError(
            f"reward {reward!r} returned {value!r} for response {response[:80]!r}; expected a number"
        ) from None
    if not math.isfinite(score):
        raise RewardError(
            f"reward {reward!r} returned {score} for response {response[:80]!r}; expected a finite number"
        )
    return score
