"""Dynamic-sampling filters: which finished groups go on to training.

A filter is `fn(group: list[Sample]) -> bool | tuple[bool, str]`: keep or not, and the reason a dropped
group is counted under. Built-in: `reward_std` drops groups whose rewards are all equal (their GRPO
advantages are all zero, so they would train on nothing); `reward_std_fallback` does the same unless
dropping the group would leave the current batch waiting for groups not yet started.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engine.errors import ConfigError
from engine.rollout.rewards import load_object
from engine.wire import Sample

GroupFilter = Callable[[list[Sample]], "bool | tuple[bool, str]"]


def keep_all(group: list[Sample]) -> tuple[bool, str]:
    return True, ""


def reward_std(group: list[Sample]) -> tuple[bool, str]:
    rewards = np.array([x.reward for x in group], dtype=np.float64)
    return (True, "") if rewards.std() > 0 else (False, "zero_reward_std")


BUILTIN: dict[str, GroupFilter] = {
    "none": keep_all,
    "reward_std": reward_std,
    "reward_std_fallback": reward_std,
}


def resolve_filter(name: str, path: str | None) -> GroupFilter:
    if path:
        fn = load_object(path)
        if not callable(fn):
            raise ConfigError(
                f"{path!r} is not callable", section="rollout", key="dynamic_sampling_filter_path"
            )
        return fn
    return BUILTIN[name]


def verdict(value: object, path: str) -> tuple[bool, str]:
    """A filter's answer as (keep, reason); anything else is an error naming the filter."""
    if isinstance(value, bool):
        return value, "" if value else "filtered"
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], bool)
        and isinstance(value[1], str)
    ):
        return value[0], value[1] or ("" if value[0] else "filtered")
    raise TypeError(f"dynamic-sampling filter {path} returned {value!r}; expected bool or (bool, reason)")
