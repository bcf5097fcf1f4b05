"""The SGLang client against a stand-in server speaking SGLang 0.5.9's HTTP contract (the embedded
engine generates behind it): generation with log-probs in SGLang's layout, abort with its finish
reason, pause and continue, weight-version reporting, health."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.rollout.hf_engine import HFEngine
from engine.rollout.sglang.client import SglangEngineClient
from engine.rollout.sglang.http import ServerError, SglangHttp
from engine.rollout.sglang.tensors import serialize_named_tensors
from engine.wire import GenerateRequest, SamplingParams
from tests.sglang_fixtures import start_fake


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path) -> Iterator[str]:
    proc, url = start_fake(tiny_ckpt, version=3)
    yield url
    proc.kill()
    proc.wait()


def request(rid: int, n: int = 8, **params) -> GenerateRequest:
    return GenerateRequest(
        rid=rid, prompt_ids=(5, 6, 7, 8), params=SamplingParams(max_new_tokens=n, **params), seed=100 + rid
    )


def run(coro):
    return asyncio.run(coro)


async def last_chunk(stream, chunk):
    """The final chunk of a /generate stream (`chunk`: the one read so far)."""
    async for chunk in stream:  # noqa: B007
        pass
    return chunk


# Seeds (100 + rid) whose responses on the tiny checkpoint run past 50 tokens without EOS, so that
# they are still running when a test aborts or pauses them.


def test_generation_matches_the_engine_with_sglang_layout(server: str, tiny_ckpt: Path) -> None:
    async def go():
        client = SglangEngineClient(server, recover=False)
        http = SglangHttp(server)
        try:
            results = await client.generate([request(i, temperature=0.8) for i in range(3)])
            raw = await http.call(
                "POST",
                "/generate",
                {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 4, "sampling_seed": 100},
                 "return_logprob": True, "rid": "raw."},
            )  # fmt: skip
            return results, raw
        finally:
            await client.close()
            await http.close()

    results, raw = run(go())
    # The same requests on the embedded engine directly: the same tokens and log-probs.
    expected = HFEngine(str(tiny_ckpt)).generate([request(i, temperature=0.8) for i in range(3)])
    for got, want in zip(results, expected, strict=True):
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
        assert got.versions == [3] * len(got.token_ids)
    meta = raw["meta_info"]
    assert meta["id"] == "raw." and meta["weight_version"] == "3" and meta["prompt_tokens"] == 4
    assert meta["finish_reason"] == {"type": "length", "length": 4} and meta["completion_tokens"] == 4
    assert [t[1] for t in meta["output_token_logprobs"]] == raw["output_ids"]  # [logprob, id, text]
    assert all(len(t) == 3 and t[0] <= 0.0 and t[2] is None for t in meta["output_token_logprobs"])


def test_unknown_fields_are_refused_as_sglang_does(server: str) -> None:
    async def go():
        http = SglangHttp(server)
        try:
            with pytest.raises(ServerError, match="unexpected keyword"):
                await http.call("POST", "/generate", {"input_ids": [1], "sampling_params": {"max_tokens": 3}})
        finally:
            await http.close()

    run(go())


def test_abort_one_request_by_rid_prefix_and_all(server: str) -> None:
    async def go():
        http = SglangHttp(server)
        body = {"input_ids": [5, 6, 7], "return_logprob": True}

        def params(seed: int) -> dict:
            return {"sampling_params": {"max_new_tokens": 50, "sampling_seed": seed}}

        first = http.generate_stream({**body, **params(100), "rid": "c9-1."})
        second = http.generate_stream({**body, **params(101), "rid": "c9-11."})
        try:
            a = await anext(first)  # both are running now
            b = await anext(second)
            await http.abort("c9-1.")  # "c9-1." is no prefix of "c9-11.": only the first stops
            a = await last_chunk(first, a)
            assert a["meta_info"]["finish_reason"] == {
                "type": "abort", "message": "Aborted", "status_code": None, "err_type": None
            }  # fmt: skip
            assert 1 <= len(a["output_ids"]) < 50
            b = await last_chunk(second, b)
            assert b["meta_info"]["finish_reason"]["type"] == "length" and len(b["output_ids"]) == 50
            third = http.generate_stream({**body, **params(103), "rid": "c9-2."})
            c = await anext(third)
            await http.abort()  # abort_all
            c = await last_chunk(third, c)
            assert c["meta_info"]["finish_reason"]["type"] == "abort"
        finally:
            await http.close()

    run(go())


def test_client_abort_returns_the_tokens_so_far(server: str) -> None:
    async def go():
        client = SglangEngineClient(server, recover=False)
        try:
            await client.abort([7])  # not submitted yet: it comes back aborted without running
            assert (await client.generate([request(7)]))[0].finish_reason == "abort"
            task = asyncio.ensure_future(client.generate([request(9, n=50)]))
            while 9 not in client._live:
                await asyncio.sleep(0.01)
            await client.http.pause("in_place")  # keeps it in flight while the abort goes out
            await client.abort([9])
            await client.http.resume_generation()
            (result,) = await task
            assert result.finish_reason == "abort" and len(result.token_ids) < 50
            assert len(result.logprobs) == len(result.versions) == len(result.token_ids)
        finally:
            await client.close()

    run(go())


def test_pause_in_place_update_and_continue(server: str, tiny_ckpt: Path) -> None:
    """A request paused in place keeps its tokens and goes on after the update with the new
    version; a request submitted while paused waits and runs entirely at the new version."""
    engine = HFEngine(str(tiny_ckpt))
    weights = {k: v + 0.01 for k, v in engine.state_dict().items()}

    async def go():
        client = SglangEngineClient(server, recover=False)
        http = SglangHttp(server)
        try:
            running = asyncio.ensure_future(client.generate([request(21, n=40)]))
            while 21 not in client._live:
                await asyncio.sleep(0.01)
            while not (await http.call("GET", "/fake/received"))["in_flight"]:
                await asyncio.sleep(0.01)
            await http.pause("in_place")
            waiting = asyncio.ensure_future(client.generate([request(22, n=5)]))
            answer = await http.update(
                "/update_weights_from_tensor",
                {"serialized_named_tensors": serialize_named_tensors(weights, 1), "flush_cache": False,
                 "weight_version": "4"},
            )  # fmt: skip
            assert "Weight version updated to 4" in answer
            assert (await http.model_info())["weight_version"] == "4"
            await http.resume_generation()
            (a,), (b,) = await running, await waiting
            assert await http.flush_cache()  # idle now
            await http.update(
                "/update_weights_from_tensor",
                {"serialized_named_tensors": serialize_named_tensors(engine.state_dict(), 1),
                 "weight_version": "3"},
            )  # fmt: skip
            return a, b
        finally:
            await client.close()
            await http.close()

    a, b = run(go())
    assert a.finish_reason in ("length", "stop") and len(a.token_ids) == len(a.versions)
    assert a.versions == sorted(a.versions) and a.versions[0] == 3 and a.versions[-1] == 4
    assert b.versions == [4] * 5


def test_pause_abort_returns_running_requests(server: str) -> None:
    async def go():
        client = SglangEngineClient(server, recover=False)
        try:
            task = asyncio.ensure_future(client.generate([request(30, n=50)]))
            while 30 not in client._live:
                await asyncio.sleep(0.01)
            while not (await client.http.call("GET", "/fake/received"))["in_flight"]:
                await asyncio.sleep(0.01)
            await client.http.pause("abort")  # returns once the running request has answered
            (result,) = await task
            await client.http.resume_generation()
            return result
        finally:
            await client.close()

    result = run(go())
    assert result.finish_reason == "abort" and len(result.token_ids) < 50


def test_health_info_and_flush(server: str) -> None:
    async def go():
        http = SglangHttp(server)
        try:
            assert await http.healthy() and await http.healthy(generate=True)
            info = await http.call("GET", "/get_model_info")
            assert info["weight_version"] == "3" and info["is_generation"] is True
            assert (await http.call("GET", "/server_info"))["version"] == "0.5.9"
            assert await http.flush_cache()
        finally:
            await http.close()
        nobody = SglangHttp("http://127.0.0.1:1")
        assert not await nobody.healthy(timeout=2)
        await nobody.close()

    run(go())


def test_memory_release_refuses_generation_until_resumed(server: str, tiny_ckpt: Path) -> None:
    async def go():
        http = SglangHttp(server)
        client = SglangEngineClient(server, recover=False)
        try:
            await http.release_memory()
            with pytest.raises(ServerError, match="released"):
                await client.generate([request(40, n=2)])
            await http.resume_memory()
            (result,) = await client.generate([request(40, n=2)])
            assert result.finish_reason == "length"
        finally:
            await http.close()
            await client.close()

    run(go())
