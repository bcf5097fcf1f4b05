"""Rewards: built-in verifiers by name, or a user function by import path, scored off the event loop.

A reward function is `fn(response: str, label: str | None, metadata: dict) -> float`. Scoring runs in a
small pool of spawned processes, so a slow or pathological verification never stalls generation and
math-verify's own timeouts (which rely on signals in a main thread) stay in force.
Guarantee: every score that comes back is a finite float; anything else raises RewardError naming the
reward and the response.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import math
import multiprocessing
import re
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from decimal import Decimal
from typing import Any

from engine.errors import ConfigError, EngineError

RewardFn = Callable[[str, "str | None", dict], float]


class RewardError(EngineError):
    """A reward function failed or returned something that is not a finite number."""


@functools.lru_cache(maxsize=65536)
def _parse_label(label: str) -> list:
    from math_verify import parse

    return parse(label)


_PLAIN_NUMBER = re.compile(r"\s*-?\d+(?:\.\d+)?\s*")


def math_reward(response: str, label: str | None, metadata: dict) -> float:
    """1.0 when math-verify finds the response's final answer equal to the label, else 0.0.

    When label and response are both plain decimal numbers, they are compared as numbers directly
    (the answer math-verify gives for them, without its parser's cost).
    """
    from math_verify import parse, verify

    if label is None:
        raise RewardError("the math reward needs a label (set rollout.label_key)")
    if _PLAIN_NUMBER.fullmatch(label) and _PLAIN_NUMBER.fullmatch(response):
        return 1.0 if Decimal(label.strip()) == Decimal(response.strip()) else 0.0
    gold = _parse_label(label)
    pred = parse(response)
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred) else 0.0


BUILTIN: dict[str, RewardFn] = {"math": math_reward}


def load_object(path: str) -> Any:
    """Import `package.module:name` (or `package.module.name`)."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise ConfigError(f"import path {path!r} must look like 'package.module:function'")
    try:
        obj = importlib.import_module(module)
    except Exception as e:  # a user module may fail on import in any way; report it as bad config
        raise ConfigError(f"import path {path!r}: cannot import {module!r}: {e!r}") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"import path {path!r}: {module!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    return obj


def resolve_reward(rm_type: str, custom_rm_path: str | None) -> RewardFn:
    """The reward function for a config: the custom path wins over rm_type, as in slime's --custom-rm-path."""
    if custom_rm_path:
        fn = load_object(custom_rm_path)
        if not callable(fn):
            raise ConfigError(f"{custom_rm_path!r} is not callable", section="rollout", key="custom_rm_path")
        return fn
    if rm_type not in BUILTIN:
        raise ConfigError(
            f"unknown reward {rm_type!r} (built-in: {', '.join(sorted(BUILTIN))})",
            section="rollout",
            key="rm_type",
        )
    return BUILTIN[rm_type]


def checked(value: Any, response: str) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise RewardError(
            f"reward returned {value!r} for response {response[:80]!r}; expected a number"
        ) from None
    if not math.isfinite(score):
        raise RewardError(f"reward returned {score} for response {response[:80]!r}; expected a finite number")
    return score


_worker_fn: RewardFn | None = None


def _init_worker(rm_type: str, custom_rm_path: str | None) -> None:
    global _worker_fn
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _worker_fn = resolve_reward(rm_type, custom_rm_path)


def _score_in_worker(responses: list[str], label: str | None, metadata: dict) -> list[float]:
    assert _worker_fn is not None
    return [checked(_worker_fn(r, label, metadata), r) for r in responses]


class RewardPool:
    """Scores responses in spawned worker processes; `await pool.score(...)` from any event loop."""

    def __init__(self, rm_type: str, custom_rm_path: str | None, workers: int = 1) -> None:
        resolve_reward(rm_type, custom_rm_path)  # fail here, naming the key, not inside a worker
        self.name = custom_rm_path or rm_type
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(rm_type, custom_rm_path),
        )

    async def score(self, responses: list[str], label: str | None, metadata: dict) -> list[float]:
        """Scores of several responses to one prompt (one round trip to a worker)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, _score_in_worker, responses, label, metadata)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"reward {self.name!r} failed on responses {responses[:2]!r}: {e!r}") from e

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
