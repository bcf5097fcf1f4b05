"""Weight sync and fault handling of the SGLang backend, with real Ray actors and a stand-in server
process: the weight-update group over gloo (group init, names/dtypes/shapes first, broadcasts in
bucket order, the version recorded), the colocated tensor path with memory release and resume, and a
server killed mid-run that is restarted at the current weights with nothing lost."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
import ray
import torch

from engine.learner.weights import bucketize
from engine.rollout.hf_engine import HFEngine
from engine.rollout.sglang.client import SglangEngineClient
from engine.rollout.sglang.http import SglangHttp
from engine.rollout.sglang.server import ServerSpec, SglangServerActor
from engine.rollout.sglang.weight_group import WeightSender
from engine.rollout.sglang.weight_sync import SglangWeightSync
from engine.wire import GenerateRequest, SamplingParams
from tests.sglang_fixtures import LAUNCHER


@pytest.fixture()
def server(ray_local, tiny_ckpt: Path):
    spec = ServerSpec(model_path=str(tiny_ckpt), launcher=LAUNCHER, start_timeout=120, max_restarts=2)
    actor = ray.remote(SglangServerActor).options(num_cpus=0).remote(spec, 0)
    ray.get(actor.start.remote())
    yield actor
    ray.get(actor.stop.remote())
    ray.kill(actor)


def new_weights(ckpt: Path, shift: float) -> dict[str, torch.Tensor]:
    return {k: v + shift for k, v in HFEngine(str(ckpt)).state_dict().items()}


async def call(url: str, method: str, path: str, body: dict | None = None):
    http = SglangHttp(url)
    try:
        return await http.call(method, path, body)
    finally:
        await http.close()


def generate(url: str, n: int = 4, rids: range = range(2)):
    async def go():
        client = SglangEngineClient(url, recover=False)
        try:
            return await client.generate(
                [
                    GenerateRequest(rid=i, prompt_ids=(5, 6, 7), params=SamplingParams(max_new_tokens=n))
                    for i in rids
                ]
            )
        finally:
            await client.close()

    return asyncio.run(go())


def test_weight_update_group_sequence_over_gloo(server, tiny_ckpt: Path) -> None:
    url = ray.get(server.url.remote())
    sender = ray.remote(WeightSender).options(num_cpus=0).remote()
    sync = SglangWeightSync([server], [1], sender, backend="gloo")
    for version, mode, shift in ((1, "resume", 0.01), (2, "wait", 0.02), (3, "continue", 0.03)):
        weights = new_weights(tiny_ckpt, shift)
        buckets = bucketize(weights, 20_000)
        assert len(buckets) > 2  # several buckets, so their order matters
        before = len(asyncio.run(call(url, "GET", "/fake/received"))["names"])
        assert sync.push([ray.put(b) for b in buckets], version, mode) == [version]
        received = asyncio.run(call(url, "GET", "/fake/received"))["names"][before:]
        assert received == list(weights)  # every name once, in bucket order
        name = "model.layers.1.mlp.down_proj.weight"
        got = asyncio.run(call(url, "POST", "/get_weights_by_name", {"name": name, "truncate_size": 50}))
        assert got == pytest.approx(weights[name].flatten()[:50].tolist(), abs=1e-6)
        assert all(r.versions == [version] * len(r.token_ids) for r in generate(url))
    assert sync.group_name == "engine_weights_1"  # one group for all three pushes
    ray.kill(sender)


def test_colocated_release_and_tensor_update(server, tiny_ckpt: Path) -> None:
    url = ray.get(server.url.remote())
    sync = SglangWeightSync([server], [1], sender=None)
    sync.release()
    assert asyncio.run(call(url, "GET", "/fake/received"))["released"] == ["kv_cache", "weights"]
    weights = new_weights(tiny_ckpt, 0.05)
    assert sync.push_tensors(weights, 7) == [7]
    state = asyncio.run(call(url, "GET", "/fake/received"))
    assert state["released"] == [] and state["names"][-len(weights) :] == list(weights)
    assert all(r.versions == [7] * len(r.token_ids) for r in generate(url))


def test_killed_server_is_restarted_at_current_weights_and_nothing_is_lost(server, tiny_ckpt: Path) -> None:
    weights = new_weights(tiny_ckpt, 0.04)
    ray.get(server.set_current.remote([ray.put(b) for b in bucketize(weights, 30_000)], 5))
    url = ray.get(server.url.remote())
    pid = ray.get(server.pid.remote())

    async def go():
        client = SglangEngineClient(url, server)
        requests = [
            GenerateRequest(rid=i, prompt_ids=(5, 6, 7), params=SamplingParams(max_new_tokens=40), seed=i)
            for i in range(6)
        ]
        task = asyncio.ensure_future(client.generate(requests))
        while (await call(url, "GET", "/fake/received"))["in_flight"] < 6:
            await asyncio.sleep(0.02)
        os.killpg(pid, signal.SIGKILL)  # the server process dies with six requests in flight
        results = await task
        await client.close()
        return client, results

    client, results = asyncio.run(go())
    assert [r.rid for r in results] == list(range(6))
    assert all(r.finish_reason in ("stop", "length") for r in results)  # none lost, none aborted
    assert all(r.versions == [5] * len(r.token_ids) for r in results)  # generated at the current weights
    assert client.resubmitted == 6
    info = ray.get(server.info.remote())
    assert info["restarts"] == 1 and info["incarnation"] == 1 and ray.get(server.pid.remote()) != pid
    new_url = info["url"]
    name = "model.embed_tokens.weight"
    got = asyncio.run(call(new_url, "POST", "/get_weights_by_name", {"name": name, "truncate_size": 20}))
    assert got == pytest.approx(weights[name].flatten()[:20].tolist(), abs=1e-6)
    assert asyncio.run(call(new_url, "GET", "/model_info"))["weight_version"] == "5"
