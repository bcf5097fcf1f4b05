"""Weight sync and fault handling of the SGLang backend, with real Ray actors and a stand-in server
process: the weight-update group over gloo (group init, names/dtypes/shapes first, broadcasts in
bucket order, the version recorded), a push that returns before the servers have applied it while the
producer learns the version only once every server reports it, the colocated tensor path with memory
release and resume in SGLang's order, and a server killed mid-run that is restarted at the current
weights with nothing lost."""

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
from engine.rollout.sglang.tensors import serialize_named_tensors
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


def control_events(events: list[list]) -> list[list]:
    """The stand-in's events without generation and without the parameter digests."""
    return [e[:2] for e in events if not e[0].startswith("generate")]


def test_colocated_release_and_tensor_update(server, tiny_ckpt: Path) -> None:
    url = ray.get(server.url.remote())
    sync = SglangWeightSync([server], [1], sender=None)
    sync.release()
    assert asyncio.run(call(url, "GET", "/fake/received"))["released"] == [
        "cuda_graph",
        "kv_cache",
        "weights",
    ]
    weights = new_weights(tiny_ckpt, 0.05)
    buckets = bucketize(weights, 30_000)
    assert len(buckets) > 2
    payloads = [serialize_named_tensors(b, 1)[0] for b in buckets]  # shared-memory files: keep `buckets`
    at_loaded = []
    loaded = lambda: at_loaded.append(asyncio.run(call(url, "GET", "/fake/received"))["released"])  # noqa: E731
    assert sync.push_tensors(payloads, 7, loaded) == [7]
    assert at_loaded == [["cuda_graph", "kv_cache"]]  # weights in, KV cache still released
    state = asyncio.run(call(url, "GET", "/fake/received"))
    assert state["released"] == [] and state["names"][-len(weights) :] == list(weights)
    assert control_events(state["events"]) == [
        ["pause", "abort"],
        ["release", ["cuda_graph", "kv_cache", "weights"]],
        ["resume", ["weights"]],
        *[["update_tensor", None]] * (len(buckets) - 1),
        ["update_tensor", "7"],
        ["resume", ["cuda_graph", "kv_cache"]],
        ["continue"],
    ]
    assert all(r.versions == [7] * len(r.token_ids) for r in generate(url))
    # A server that was not released (a resumed run's first push) only loads the weights.
    before = len(state["events"])
    assert sync.push_tensors(payloads, 8) == [8]
    events = asyncio.run(call(url, "GET", "/fake/received"))["events"][before:]
    assert control_events(events) == [*[["update_tensor", None]] * (len(buckets) - 1), ["update_tensor", "8"]]


@ray.remote(num_cpus=0)
class VersionLog:
    """Stands in for the producer's set_version: Ray runs it once its arguments (the servers'
    acknowledgements) are resolved; it records what every server reports at that moment."""

    def __init__(self, urls: list[str]) -> None:
        self.urls, self.told = urls, []

    async def set_version(self, version: int, *applied: int) -> None:
        reported = [(await call(url, "GET", "/model_info"))["weight_version"] for url in self.urls]
        self.told.append({"version": version, "applied": list(applied), "reported": reported})

    async def log(self) -> list[dict]:
        return self.told


def test_push_returns_before_the_servers_apply_and_the_producer_learns_after_all(
    ray_local, tiny_ckpt: Path
) -> None:
    spec = ServerSpec(model_path=str(tiny_ckpt), launcher=LAUNCHER, start_timeout=120)
    servers = [ray.remote(SglangServerActor).options(num_cpus=0).remote(spec, i) for i in range(2)]
    urls = ray.get([s.start.remote() for s in servers])
    sender = ray.remote(WeightSender).options(num_cpus=0).remote()
    sync = SglangWeightSync(servers, [1, 1], sender, backend="gloo")
    producer = VersionLog.remote(urls)
    try:
        for version, mode in ((1, "continue"), (2, "resume"), (3, "wait")):
            buckets = [ray.put(b) for b in bucketize(new_weights(tiny_ckpt, 0.01 * version), 20_000)]
            asyncio.run(call(urls[1], "POST", "/fake/hold_updates", {"hold": True}))
            events = ["push submitted"]
            push = sync.start_push(buckets, version, mode)  # returns at once: nothing is waited for
            events.append("push returned")
            told = producer.set_version.remote(version, *push.applied)
            assert ray.get(push.applied[0]) == version  # server 0 holds it...
            events.append("server 0 applied")
            sync.wait_sent(push)  # ...and the sender has sent every bucket (server 1 loaded them)
            held = asyncio.run(call(urls[1], "GET", "/model_info"))["weight_version"]
            assert held == str(version - 1)  # server 1 holds the update's answer back: not reported yet
            assert ray.wait([told], timeout=0)[0] == []  # so the producer has not been told
            asyncio.run(call(urls[1], "POST", "/fake/hold_updates", {"hold": False}))
            ray.get(told)
            events.append("producer told")
            assert events == ["push submitted", "push returned", "server 0 applied", "producer told"]
            assert ray.get(producer.log.remote())[-1] == {
                "version": version,
                "applied": [version, version],
                "reported": [str(version)] * 2,  # every server reports it when the producer learns it
            }
    finally:
        ray.get([s.stop.remote() for s in servers])
        for actor in (*servers, sender, producer):
            ray.kill(actor)


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
