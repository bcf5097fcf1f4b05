"""The buffer: whole groups out in arrival order, duplicates refused, bad frames counted, over ZeroMQ."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
import zmq

from engine.buffer.buffer import BufferActor, rollout_stats
from engine.buffer.groups import GroupAssembler
from engine.transport import ZmqSampleSink
from tests.helpers import sample


def test_groups_assemble_from_any_arrival_order() -> None:
    samples = [sample(group_id=g, index=i, group_size=3, reward=float(i)) for g in range(4) for i in range(3)]
    random.Random(1).shuffle(samples)
    asm = GroupAssembler()
    completed = []
    for x in samples:
        assert asm.add(x) is None
        if asm.ready_groups:
            completed.extend(asm.pop(asm.ready_groups))
    assert asm.partial_groups == 0 and len(completed) == 4
    for group in completed:
        assert len({x.group_id for x in group}) == 1 and [x.index for x in group] == [0, 1, 2]
    assert sorted(x.group_id for x in itertools.chain(*completed)) == sorted(x.group_id for x in samples)


def test_duplicates_and_inconsistent_groups_are_refused() -> None:
    asm = GroupAssembler()
    assert asm.add(sample(group_id=1, index=0, group_size=2)) is None
    assert asm.add(sample(group_id=1, index=0, group_size=2, reward=5.0)) == "duplicate_index"
    assert asm.add(sample(group_id=1, index=1, group_size=3)) == "group_size_mismatch"
    assert asm.add(sample(group_id=1, index=1, group_size=2)) is None
    assert asm.add(sample(group_id=1, index=1, group_size=2)) == "group_already_complete"
    (group,) = asm.pop(1)
    assert group[0].reward == 1.0  # the first copy stays
    assert dict(asm.rejected) == {"duplicate_index": 1, "group_size_mismatch": 1, "group_already_complete": 1}
    with pytest.raises(ValueError):
        asm.pop(1)


def test_rollout_stats() -> None:
    xs = [sample(reward=1.0, n=2), sample(reward=0.0, n=4, status="truncated")]
    stats = rollout_stats(xs)
    assert stats["rollout/reward_mean"] == 0.5 and stats["rollout/accuracy"] == 0.5
    assert stats["rollout/response_len_mean"] == 3.0 and stats["rollout/truncated_frac"] == 0.5


def test_buffer_over_zeromq_survives_garbage() -> None:
    buffer = BufferActor()
    try:
        ctx = zmq.Context()
        raw = ctx.socket(zmq.PUSH)
        raw.connect(buffer.address())
        raw.send(b"not a sample")

        async def push() -> None:
            sink = ZmqSampleSink(buffer.address())
            for g in (0, 1):
                for i in (1, 0):
                    await sink.send(sample(group_id=g, index=i, group_size=2, reward=float(g)))
            sink.close()

        asyncio.run(push())
        samples, stats = buffer.get_batch(2, timeout_s=10)
        assert [(x.group_id, x.index) for x in samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert stats["rollout/reward_mean"] == 0.5
        info = buffer.stats()
        assert info["invalid_frames"] == {"undecodable": 1} and info["accepted"] == 4
        with pytest.raises(TimeoutError):
            buffer.get_batch(1, timeout_s=0.2)
        raw.close()
        ctx.term()
    finally:
        buffer.close()
