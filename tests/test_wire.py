"""The sample stream: msgspec over real ZeroMQ sockets, bit for bit; bad frames are refused."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np
import pytest

from engine.errors import WireError
from engine.transport import ZmqSampleSink, ZmqSampleSource
from engine.wire import LOGPROB_DTYPE, Sample, decode_sample, encode_sample
from tests.helpers import sample


def random_sample(rng: np.random.Generator, group_id: int, index: int) -> Sample:
    n = int(rng.integers(1, 50))
    logprobs = rng.standard_normal(n).astype(LOGPROB_DTYPE) * 10
    logprobs[0] = np.float32(-0.0)
    if n > 2:
        logprobs[1] = np.float32(1e-42)  # a subnormal must survive too
    return Sample.build(
        prompt_ids=rng.integers(0, 2**31 - 1, int(rng.integers(1, 30))),
        response_ids=rng.integers(0, 2**31 - 1, n),
        rollout_logprobs=logprobs,
        versions=rng.integers(0, 5, n),
        loss_mask=rng.integers(0, 2, n),
        group_id=group_id,
        index=index,
        group_size=4,
        prompt_index=int(rng.integers(0, 1000)),
        reward=float(rng.standard_normal()),
        status="truncated",
        label="42",
        metadata={"source": "test", "nested": {"x": [1, 2]}},
        response_text="héllo",
    )


def test_buffers_are_raw_little_endian() -> None:
    x = sample(n=3)
    assert x.response_ids == np.array([10, 11, 12], dtype="<i4").tobytes()
    assert x.logprob_array.dtype == np.dtype("<f4") and x.response_len == 3
    encoded = encode_sample(x)
    assert x.response_ids in encoded  # carried as one binary blob, not a list of numbers


def test_round_trip_over_zeromq_is_bit_exact() -> None:
    rng = np.random.default_rng(0)
    sent = [random_sample(rng, g, i) for g in range(5) for i in range(4)]
    source = ZmqSampleSource()

    async def push() -> None:
        sink = ZmqSampleSink(source.address)
        for g in range(5):
            await sink.send(sent[4 * g : 4 * g + 4])
        sink.close()

    asyncio.run(push())
    got = []
    while len(got) < len(sent):
        xs = source.recv(timeout_ms=5000)
        assert xs is not None and len(xs) == 4, "message lost or split in transit"
        got += xs
    source.close()
    assert got == sent
    for a, b in zip(got, sent, strict=True):
        assert encode_sample(a) == encode_sample(b)
        assert a.logprob_array.tobytes() == b.logprob_array.tobytes()


@pytest.mark.parametrize(
    "frame",
    [
        b"\x00\x01garbage",
        b"",
        msgspec.msgpack.encode({"type": "sample/0", "group_id": 1}),
        encode_sample(sample())[:-3],
    ],
)
def test_bad_frames_raise_wire_error(frame: bytes) -> None:
    with pytest.raises(WireError):
        decode_sample(frame)


def test_inconsistent_lengths_are_refused() -> None:
    good = sample(n=3)
    bad = msgspec.structs.replace(good, rollout_logprobs=good.rollout_logprobs[:4])
    with pytest.raises(WireError, match="rollout_logprobs has 1 entries, response has 3"):
        decode_sample(encode_sample(bad))
    with pytest.raises(WireError, match="index outside group"):
        sample(index=2, group_size=2)
    with pytest.raises(WireError, match="not finite"):
        sample(reward=float("nan"))
