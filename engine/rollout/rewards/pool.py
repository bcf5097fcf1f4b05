"""The reward pool: the one entry point the producer awaits, `await pool.score(responses, label, metadata)`.

Which reward scores a group: `custom_rm_path` when set (per response, or per group with group_rm),
else `metadata["rm_type"]`, else `rm_type`. Synchronous rewards (the built-in verifiers, a plain custom
function) run in a small pool of spawned processes, one round trip per group, so a slow or pathological
verification never stalls generation and math-verify's own timeouts (signals in a main thread) stay in
force; `remote_rm` and `async def` custom rewards run on the caller's event loop.
Guarantee: `score` returns one finite float per response, in order, or raises RewardError naming the
reward and a response; an unknown rm_type is a ConfigError naming rollout.rm_type when the pool is
built, and a RewardError naming it when it comes from a sample's metadata.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from engine.errors import ConfigError
from engine.rollout.rewards.base import RewardError, checked
from engine.rollout.rewards.ifbench import parse_metadata
from engine.rollout.rewards.remote import DEFAULT_BACKOFF, RemoteReward
from engine.rollout.rewards.verifiers import REMOTE, base_name, local_reward, name_problem

if TYPE_CHECKING:
    from engine.rollout.config import RolloutConfig


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


def remote_rm(response: str, label: Any, metadata: dict) -> float:
    """Stands for remote_rm in resolve_reward: it is scored over HTTP by a RewardPool, never called."""
    raise RewardError("remote_rm is scored over HTTP by a RewardPool with rollout.rm_url set")


def resolve_reward(rm_type: str, custom_rm_path: str | None) -> Callable:
    """The reward function for a config: the custom path wins over rm_type, as in slime's --custom-rm-path."""
    if custom_rm_path:
        fn = load_object(custom_rm_path)
        if not callable(fn):
            raise ConfigError(f"{custom_rm_path!r} is not callable", section="rollout", key="custom_rm_path")
        return fn
    problem = name_problem(rm_type)
    if problem is not None:
        raise ConfigError(problem, section="rollout", key="rm_type")
    return remote_rm if rm_type == REMOTE else local_reward(rm_type)


def _scores(values: Any, responses: Sequence[str], reward: str) -> list[float]:
    if not isinstance(values, list | tuple) or len(values) != len(responses):
        raise RewardError(
            f"group reward {reward!r} returned {values!r:.200} for {len(responses)} responses; expected a "
            f"list of {len(responses)} numbers"
        )
    return [checked(v, r, reward) for v, r in zip(values, responses, strict=True)]


_worker_custom: Callable | None = None


def _init_worker(custom_rm_path: str | None) -> None:
    global _worker_custom
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _worker_custom = load_object(custom_rm_path) if custom_rm_path else None


def _score_in_worker(
    name: str, custom: bool, responses: list[str], label: Any, metadata: dict
) -> list[float]:
    fn = _worker_custom if custom else local_reward(name)
    assert fn is not None
    return [checked(fn(r, label, metadata), r, name) for r in responses]


def _score_group_in_worker(name: str, responses: list[str], label: Any, metadata: dict) -> list[float]:
    assert _worker_custom is not None
    return _scores(_worker_custom(responses, label, metadata), responses, name)


def _failed(reward: str, responses: Sequence[str], e: BaseException) -> RewardError:
    return RewardError(f"reward {reward!r} failed on responses {list(responses[:2])!r:.300}: {e!r}")


class RewardPool:
    """Scores responses in spawned worker processes, over HTTP or in coroutines; `await pool.score(...)`
    from any event loop."""

    def __init__(
        self,
        rm_type: str = "math",
        custom_rm_path: str | None = None,
        workers: int = 1,
        *,
        group_rm: bool = False,
        rm_url: str | None = None,
        rm_timeout: float = 30.0,
        rm_max_retries: int = 3,
        rm_concurrency: int = 64,
        rm_backoff: float = DEFAULT_BACKOFF,
    ) -> None:
        fn = resolve_reward(rm_type, custom_rm_path)  # fail here, naming the key, not inside a worker
        if group_rm and not custom_rm_path:
            raise ConfigError("a group reward needs custom_rm_path", section="rollout", key="group_rm")
        if rm_type == REMOTE and not rm_url:
            raise ConfigError("rm_type = 'remote_rm' needs rm_url", section="rollout", key="rm_url")
        self.rm_type, self.custom_rm_path, self.group_rm = rm_type, custom_rm_path, group_rm
        self.name = custom_rm_path or rm_type
        self._async_fn = fn if custom_rm_path and inspect.iscoroutinefunction(fn) else None
        self._remote: RemoteReward | None = None
        if rm_url:
            self._remote = RemoteReward(
                rm_url,
                timeout=rm_timeout,
                max_retries=rm_max_retries,
                concurrency=rm_concurrency,
                backoff=rm_backoff,
            )
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(custom_rm_path,),
        )

    @classmethod
    def from_config(cls, rollout: RolloutConfig) -> RewardPool:
        r = rollout
        return cls(
            r.rm_type,
            r.custom_rm_path,
            r.reward_workers,
            group_rm=r.group_rm,
            rm_url=r.rm_url,
            rm_timeout=r.rm_timeout,
            rm_max_retries=r.rm_max_retries,
            rm_concurrency=r.rm_concurrency,
        )

    def reward_for(self, metadata: dict) -> str:
        """The reward name for a sample: metadata["rm_type"] when present, else rm_type."""
        name = metadata.get("rm_type", self.rm_type)
        problem = name_problem(name)
        if problem is not None:
            raise RewardError(f"metadata['rm_type']: {problem}")
        if name == REMOTE and self._remote is None:
            raise RewardError("metadata['rm_type'] = 'remote_rm' needs rollout.rm_url")
        return name

    async def score(
        self, responses: list[str], label: Any, metadata: dict, *, prompt: str | None = None
    ) -> list[float]:
        """Scores of several responses to one prompt (one round trip to a worker for a sync reward)."""
        if not responses:
            return []
        if self.custom_rm_path:
            name = self.custom_rm_path
            if self._async_fn is not None:
                return await self._await_custom(name, responses, label, metadata)
            if self.group_rm:
                return await self._in_pool(name, _score_group_in_worker, name, responses, label, metadata)
            return await self._in_pool(name, _score_in_worker, name, True, responses, label, metadata)
        name = self.reward_for(metadata)
        if name == REMOTE:
            assert self._remote is not None
            values = await self._remote.score(prompt, responses, label, metadata)
            return [checked(v, r, name) for v, r in zip(values, responses, strict=True)]
        if base_name(name) == "ifbench":
            parse_metadata(metadata)  # malformed metadata is reported here, before a worker sees it
        return await self._in_pool(name, _score_in_worker, name, False, responses, label, metadata)

    async def _in_pool(self, name: str, fn: Callable, *args: Any) -> list[float]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except RewardError:
            raise
        except Exception as e:
            raise _failed(name, args[-3], e) from e

    async def _await_custom(self, name: str, responses: list[str], label: Any, metadata: dict) -> list[float]:
        fn = self._async_fn
        assert fn is not None
        try:
            if self.group_rm:
                return _scores(await fn(responses, label, metadata), responses, name)
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(fn(r, label, metadata)) for r in responses]
            return [checked(t.result(), r, name) for t, r in zip(tasks, responses, strict=True)]
        except ExceptionGroup as eg:
            e = eg.exceptions[0]
            raise (e if isinstance(e, RewardError) else _failed(name, responses, e)) from None
        except RewardError:
            raise
        except Exception as e:
            raise _failed(name, responses, e) from e

    def close(self) -> None:
        """Close the HTTP session (safe when its loop is gone) and stop the worker processes."""
        try:
            if self._remote is not None:
                self._remote.close()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
