"""Garbage on the sample socket: 10,000+ malformed messages (random bytes, truncated samples, wrong
schema, wrong version, absurd sizes, non-finite values) interleaved with a run's real samples. The
buffer actor (a real Ray actor with its ZeroMQ socket) rejects and counts every one by reason, keeps
running, and every real sample arrives in its batch."""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections import Counter

import msgspec
import numpy as np
import pytest
import zmq

from engine.buffer.buffer import BufferActor, batch_digest
from engine.errors import WireError
from engine.ratelog import RateLimitedLog
from engine.transport import TransportConfig
from engine.wire import LOGPROB_DTYPE, decode_sample, encode_sample, pack
from tests.helpers import sample

MAX_BYTES = 1 << 20


def real_batches(batches: int, groups: int, n: int) -> list[list[list]]:
    """batches x groups x n valid samples (group ids in batch order)."""
    out = []
    for b in range(batches):
        out.append(
            [
                [sample(b * groups + g, i, n, n=8 + i, reward=float(i), batch=b) for i in range(n)]
                for g in range(groups)
            ]
        )
    return out


def malformed(rng: random.Random, template: bytes) -> tuple[str, list[bytes]]:
    """One malformed message and the reason the buffer must count it under."""
    base = msgspec.msgpack.decode(template)
    kind = rng.randrange(9)
    if kind == 0:  # random bytes
        data = rng.randbytes(rng.randrange(1, 2000))
        try:
            msgspec.msgpack.decode(data)
        except (msgspec.DecodeError, ValueError):  # ValueError: a str that is not UTF-8
            return "undecodable", [data]
        return "wrong_schema", [msgspec.msgpack.encode(rng.random())]
    if kind == 1:  # a valid sample cut short
        return "undecodable", [template[: rng.randrange(1, len(template))]]
    if kind == 2:  # right version, wrong field types or missing fields
        broken = dict(base)
        field = rng.choice(["group_id", "reward", "status", "prompt_ids", "index"])
        if rng.random() < 0.5:
            del broken[field]
        else:
            broken[field] = [1, "x"]
        return "wrong_schema", [msgspec.msgpack.encode(broken)]
    if kind == 3:  # another schema version
        return "wrong_version", [msgspec.msgpack.encode({**base, "type": f"sample/{rng.randrange(2, 99)}"})]
    if kind == 4:  # absurd declared sizes: a bin32 / array32 header claiming gigabytes
        header = rng.choice([b"\xc6", b"\xdd", b"\xdb"]) + struct.pack(">I", rng.randrange(1 << 30, 1 << 32))
        return "undecodable", [b"\x81\xa4type" + header + rng.randbytes(16)]
    if kind == 5:  # a message over max_message_bytes (each frame under it)
        return "too_large", [b"\x00" * (MAX_BYTES // 2 + 1)] * 2
    if kind == 6:  # buffers that disagree with each other
        return "invalid_sample", [msgspec.msgpack.encode({**base, "rollout_logprobs": b"\x00" * 4})]
    if kind == 7:  # NaN or infinite reward / log-prob
        if rng.random() < 0.5:
            return "non_finite", [
                msgspec.msgpack.encode({**base, "reward": rng.choice([float("nan"), float("inf")])})
            ]
        lp = np.full(len(base["response_ids"]) // 4, -0.5, dtype=LOGPROB_DTYPE)
        lp[rng.randrange(len(lp))] = rng.choice([np.nan, np.inf, -np.inf])
        return "non_finite", [msgspec.msgpack.encode({**base, "rollout_logprobs": lp.tobytes()})]
    # a group message with one bad frame: all of it is refused (not half a group)
    return "undecodable", [template, template[:-3]]


def test_nonfinite_values_are_rejected_naming_the_sample() -> None:
    good = sample(7, 1, 2, n=4)
    bad = msgspec.structs.replace(
        good, rollout_logprobs=pack([-0.1, float("nan"), -0.2, -0.3], LOGPROB_DTYPE)
    )
    with pytest.raises(WireError, match=r"sample 7/1 \(prompt 7\): rollout_logprobs\[1\] is nan") as e:
        decode_sample(encode_sample(bad))
    assert e.value.reason == "non_finite"
    with pytest.raises(WireError, match=r"sample 7/1 \(prompt 7\): reward inf is not finite"):
        decode_sample(encode_sample(msgspec.structs.replace(good, reward=float("inf"))))
    with pytest.raises(WireError, match=r"rollout_logprobs\[0\] is -inf"):
        sample(3, n=2, rollout_logprobs=[float("-inf"), -1.0])  # the producer cannot build one either


def test_rejections_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.ratelog")
    limited = RateLimitedLog(log, "rejected", first=5, interval_s=3600)
    with caplog.at_level(logging.WARNING, logger="test.ratelog"):
        for i in range(10_000):
            limited.event("undecodable" if i % 2 else "too_large", f"message {i}")
        limited.flush()
    assert limited.counts == Counter({"undecodable": 5000, "too_large": 5000})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 7  # 5 one by one, one summary at the first event after them, one at the end
    assert "9994 more" in lines[-1] and "10000 in all" in lines[-1]


def test_ten_thousand_malformed_messages_do_not_stop_the_buffer(ray_local) -> None:
    ray = ray_local
    batches, groups, n = 6, 4, 4
    cfg = TransportConfig(max_message_bytes=MAX_BYTES)
    buffer = ray.remote(BufferActor).options(num_cpus=0, max_concurrency=4).remote(groups, None, cfg)
    address = ray.get(buffer.address.remote())
    real = real_batches(batches, groups, n)
    rng = random.Random(0)
    template = encode_sample(sample(99, 0, 1, n=16))
    expected: Counter[str] = Counter()
    ctx = zmq.Context()
    fuzzers = [ctx.socket(zmq.PUSH) for _ in range(4)]
    try:
        for sock in fuzzers:
            sock.setsockopt(zmq.SNDHWM, 0)  # queue everything: the test sends as fast as it can
            sock.connect(address)
        from engine.transport import ZmqSampleSink

        sink = ZmqSampleSink(address, cfg)
        real_groups = [g for batch in real for g in batch]
        per_group = 10_500 // len(real_groups) + 1

        async def send_real(group: list) -> None:
            await sink.send(group)

        for group in real_groups:
            for _ in range(per_group):
                reason, frames = malformed(rng, template)
                expected[reason] += 1
                rng.choice(fuzzers).send_multipart(frames)
            asyncio.run(send_real(group))
        assert expected.total() >= 10_000 and set(expected) == {
            "undecodable",
            "wrong_schema",
            "wrong_version",
            "too_large",
            "invalid_sample",
            "non_finite",
        }
        for b in range(batches):
            samples, stats = ray.get(buffer.get_batch.remote(b, 120.0))
            assert batch_digest(samples) == batch_digest([x for g in real[b] for x in g])
            assert stats["group_ids"] == [b * groups + g for g in range(groups)]
        while ray.get(buffer.stats.remote())["invalid_frames"] != expected:
            counts = ray.get(buffer.stats.remote())["invalid_frames"]
            assert Counter(counts).total() <= expected.total(), (counts, expected)
        stats = ray.get(buffer.stats.remote())
        assert stats["received"] == batches * groups * n and not stats["rejected"]
        sink.close()
    finally:
        for sock in fuzzers:
            sock.close(linger=0)
        ctx.term()
        ray.get(buffer.close.remote())
        ray.kill(buffer)
