"""Supervision of one inference engine actor, from the producer's side: restart, current weights,
resubmission, and detection of a stuck engine.

The engine actor is created with Ray's `max_restarts` (inference.max_restarts). Guarantees:
- when the engine process dies, every generate call that was in flight on it is resubmitted, unchanged
  (prompt + the tokens of earlier rounds, the same seed and sample offset), once the restarted actor
  answers and holds the policy version the producer was last given (the weights of that push are kept
  as Ray object references for this); requests aborted meanwhile come back as aborted, not resubmitted;
- an engine that has not answered for inference.stall_timeout_s (watched from the first call on, also
  while no call is waiting on it: a hang in a weight update), or whose progress count has not moved for
  that long while calls are in flight, is killed, and then restarted and resubmitted to as above;
- an engine Ray restarted while no call was in flight (nothing fails, but it holds the weights it started
  with) is recognised by its first answer with tokens older than the version every engine was known to
  hold: that answer is discarded, the engine given the current weights, and the call resubmitted;
- every restart and stall is logged and counted (engine_restarts, engine_stalls,
  engine_calls_resubmitted, engine_requests_resubmitted); an engine that fails more than max_restarts
  times, or does not come back within RESTART_WAIT_S, ends the run with an error naming it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError

from engine.rollout.engines import InferenceEngine, RayEngineClient, aborted
from engine.wire import GenerateRequest, GenerateResult

log = logging.getLogger(__name__)

RESTART_WAIT_S = 600.0  # how long a restarted engine may take to answer (process start, model load)

# () -> (version, weight buckets or None): the last push the producer was given
WeightSource = Callable[[], tuple[int, list[Any] | None]]


class RestartedBetweenCalls(Exception):
    """An engine answered with tokens older than the version it was known to hold: Ray restarted it while
    no call was in flight, so nothing failed, but it lost the weights pushed since it started."""


class EngineGuard(InferenceEngine):
    def __init__(
        self,
        actor: Any,
        index: int,
        weights: WeightSource,
        *,
        stall_timeout_s: float,
        max_restarts: int,
        counts: Counter[str],
    ) -> None:
        self.actor, self.index = actor, index
        self.client = RayEngineClient(actor)
        self._weights = weights
        self._stall_timeout = stall_timeout_s
        self._max_restarts = max_restarts
        self.counts = counts
        self.restarts = 0
        self._incarnation = 0
        self._lock = asyncio.Lock()
        self._aborted: set[int] = set()
        self._in_flight = 0
        self._watchdog: asyncio.Task | None = None

    async def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        results: dict[int, GenerateResult] = {}
        todo = list(requests)
        try:
            while todo:
                incarnation = self._incarnation
                floor = self._weights()[0]  # every engine held this version before the producer learned it
                self._enter()
                try:
                    out = await self.client.generate(todo)
                    oldest = min((v for x in out for v in x.versions), default=floor)
                    if oldest < floor:  # Ray restarted it between calls: it holds its initial weights
                        raise RestartedBetweenCalls(
                            f"engine {self.index} answered at policy version {oldest} < {floor}: "
                            "restarted between calls"
                        )
                except (RayActorError, RestartedBetweenCalls) as e:
                    await self._recover(incarnation, e)
                    results.update((r.rid, aborted(r)) for r in todo if r.rid in self._aborted)
                    todo = [r for r in todo if r.rid not in self._aborted]
                    if todo:
                        self.counts["engine_calls_resubmitted"] += 1
                        self.counts["engine_requests_resubmitted"] += len(todo)
                    continue
                finally:
                    self._in_flight -= 1
                results.update((r.rid, x) for r, x in zip(todo, out, strict=True))
                todo = []
        finally:
            self._aborted.difference_update(r.rid for r in requests)
        return [results[r.rid] for r in requests]

    async def abort(self, rids: list[int]) -> None:
        self._aborted.update(rids)  # applied at resubmission if the engine is being restarted
        try:
            await self.client.abort(rids)
        except RayActorError as e:  # the engine is down: its requests are resubmitted without these
            log.info("engine %d: abort of %d requests deferred to its restart (%r)", self.index, len(rids), e)

    async def abort_all(self) -> None:
        await self.actor.abort_all.remote()

    # --- restarts -----------------------------------------------------------------------------------

    async def _recover(self, incarnation: int, error: BaseException) -> None:
        """Wait for Ray's restart of the engine and give it the current weights (once per failure,
        whichever caller sees it first)."""
        async with self._lock:
            if incarnation != self._incarnation:
                return  # another caller has already brought the restarted engine up
            self.restarts += 1
            self.counts["engine_restarts"] += 1
            if self.restarts > self._max_restarts:
                raise RuntimeError(
                    f"engine {self.index} failed {self.restarts} times "
                    f"(inference.max_restarts = {self._max_restarts}): {error!r}"
                ) from error
            log.warning("engine %d failed (%r): waiting for its restart", self.index, error)
            t0 = time.monotonic()
            while True:
                try:
                    await asyncio.wait_for(_awaitable(self.actor.ready.remote()), RESTART_WAIT_S)
                    break
                except (RayActorError, TimeoutError) as e:
                    if time.monotonic() - t0 > RESTART_WAIT_S:
                        raise RuntimeError(
                            f"engine {self.index} did not come back within {RESTART_WAIT_S:g} s after "
                            f"failing with {error!r}"
                        ) from e
                    await asyncio.sleep(0.2)
            version, weights = self._weights()
            if weights is not None:
                await self.actor.update_weights.remote(weights, version, "wait")
            self._incarnation += 1
            log.warning(
                "engine %d restarted at policy version %d in %.1f s (restart %d of at most %d); "
                "resubmitting its requests",
                self.index,
                version,
                time.monotonic() - t0,
                self.restarts,
                self._max_restarts,
            )

    # --- stalls -------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Generate calls waiting on the engine now."""
        return self._in_flight

    def _enter(self) -> None:
        self._in_flight += 1
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """From the first call on, for as long as the producer runs: kill the engine when it has not
        answered for stall_timeout_s (stopped, hung in a weight update: nothing else would notice when no
        generate call is waiting on it), or when calls are in flight and its progress count has not moved
        for that long. Ray then restarts it; watching goes on."""
        loop = asyncio.get_running_loop()
        period = self._stall_timeout / 4
        last, since = None, loop.time()
        while True:
            try:
                beat = await asyncio.wait_for(_awaitable(self.actor.heartbeat.remote()), period)
                answered = True
            except TimeoutError:
                beat, answered = last, False  # no answer is no progress
            except RayActorError:  # dead or restarting: calls in flight fail and recover
                last, since = None, loop.time()
                await asyncio.sleep(period)
                continue
            now = loop.time()
            alive = beat != last if self._in_flight > 0 else answered
            if alive or self._lock.locked():  # progress (or an answer, when idle), or a restart under way
                last, since = beat, now
            elif now - since > self._stall_timeout:
                self.counts["engine_stalls"] += 1
                log.error(
                    "engine %d made no progress for %.0f s (inference.stall_timeout_s = %g) with %d "
                    "calls in flight: killing it for a restart",
                    self.index,
                    now - since,
                    self._stall_timeout,
                    self._in_flight,
                )
                ray.kill(self.actor, no_restart=False)
                last, since = None, now
            await asyncio.sleep(period)


async def _awaitable(ref: Any) -> Any:
    """An ObjectRef as a coroutine (asyncio.wait_for needs one it can cancel)."""
    return await ref
