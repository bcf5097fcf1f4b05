"""An engine that Ray restarts while no call is in flight fails nothing, but comes back with the weights
it started with: the guard (engine/rollout/engine_guard.py) must notice from its answer (tokens older than
the version every engine was known to hold), give it the current weights and resubmit."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter

import ray

from engine.cluster import actor_options
from engine.rollout.config import InferenceConfig
from engine.rollout.engine_guard import EngineGuard
from engine.rollout.engines import EmbeddedEngineActor
from engine.wire import GenerateRequest, SamplingParams
from tests.helpers import prompt_ids


def test_an_engine_restarted_between_calls_gets_the_weights_back(ray_local, tiny_ckpt) -> None:
    engine = (
        ray.remote(EmbeddedEngineActor)
        .options(**actor_options(max_restarts=2))
        .remote(str(tiny_ckpt), InferenceConfig(), 0, 1, {})
    )
    ray.get(engine.ready.remote())
    trained = {k: v + 0.01 * (i % 3) for i, (k, v) in enumerate(ray.get(engine.state_dict.remote()).items())}
    buckets = [ray.put(trained)]
    assert ray.get(engine.update_weights.remote(buckets, 3, "wait")) == 3
    counts: Counter[str] = Counter()
    guard = EngineGuard(engine, 0, lambda: (3, buckets), stall_timeout_s=60, max_restarts=2, counts=counts)
    req = [
        GenerateRequest(
            rid=1, prompt_ids=prompt_ids(tiny_ckpt, "2+3="), params=SamplingParams(max_new_tokens=6), seed=7
        )
    ]

    before = asyncio.run(guard.generate(req))
    assert before[0].versions == [3] * len(before[0].token_ids) and not counts
    pid = ray.get(engine.pid.remote())
    os.kill(pid, signal.SIGKILL)  # no call in flight: nothing fails, Ray restarts it with the initial weights
    while True:
        try:
            if ray.get(engine.pid.remote(), timeout=60) != pid:
                break
        except ray.exceptions.RayActorError:
            time.sleep(0.2)
    after = asyncio.run(guard.generate(req))
    assert counts["engine_restarts"] == 1 and counts["engine_requests_resubmitted"] == 1, counts
    assert after[0].versions == [3] * len(after[0].token_ids)
    assert after[0].token_ids == before[0].token_ids and after[0].logprobs == before[0].logprobs
    held = ray.get(engine.state_dict.remote())
    assert all(bool((held[k] == v).all()) for k, v in trained.items())
    ray.kill(engine)


def test_a_stopped_engine_with_no_call_waiting_on_it_is_killed_and_restarted(ray_local, tiny_ckpt) -> None:
    """A hang while no generate call waits on the engine (say, inside a weight update the controller is
    waiting for) would block the run for good if only calls in flight were watched."""
    engine = (
        ray.remote(EmbeddedEngineActor)
        .options(**actor_options(max_restarts=2))
        .remote(str(tiny_ckpt), InferenceConfig(), 0, 1, {})
    )
    ray.get(engine.ready.remote())
    counts: Counter[str] = Counter()
    guard = EngineGuard(engine, 0, lambda: (0, None), stall_timeout_s=2, max_restarts=2, counts=counts)
    req = [
        GenerateRequest(
            rid=1, prompt_ids=prompt_ids(tiny_ckpt, "2+3="), params=SamplingParams(max_new_tokens=4), seed=7
        )
    ]
    pid = ray.get(engine.pid.remote())

    async def scenario() -> None:
        await guard.generate(req)  # the watchdog starts with the first call
        assert guard.in_flight == 0
        os.kill(pid, signal.SIGSTOP)
        for _ in range(600):  # the watchdog kills it within about 2.5 s; a minute means it never will
            if counts["engine_stalls"]:
                return
            await asyncio.sleep(0.1)
        os.kill(pid, signal.SIGCONT)
        raise AssertionError("the stopped engine was never killed")

    asyncio.run(scenario())
    assert counts["engine_stalls"] == 1 and not counts["engine_restarts"]  # no call had to be recovered
    assert ray.get(engine.pid.options(max_task_retries=-1).remote(), timeout=120) != pid  # Ray restarted it
    ray.kill(engine)
