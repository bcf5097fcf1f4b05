"""The buffer: whole groups routed to their batches, in any arrival order, over real ZeroMQ sockets."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.buffer.buffer import BufferActor, rollout_stats, staleness_stats
from engine.buffer.groups import BatchBuffer, GroupAssembler
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


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 3),  # batch size (groups)
    st.integers(1, 3),  # group size
    st.integers(1, 4),  # batches
    st.integers(0, 3),  # partial groups
    st.randoms(use_true_random=False),
)
def test_batches_are_whole_unmixed_groups_whatever_the_arrival_order(B, n, N, partial, rng) -> None:
    groups = [(g, g // B) for g in range(B * N)] + [(B * N + p, -1) for p in range(partial)]
    samples = [sample(group_id=g, index=i, group_size=n, batch=b) for g, b in groups for i in range(n)]
    rng.shuffle(samples)
    buf = BatchBuffer(B)
    handed: list[int] = []
    for x in samples:
        assert buf.add(x) is None
        for b in range(N):
            if buf.ready(b):
                out = buf.pop(b)
                ids = [x.group_id for x in out]
                assert len(out) == B * n and sorted(set(ids)) == sorted(g for g, gb in groups if gb == b)
                assert all(ids.count(g) == n for g in set(ids))  # whole groups, each once
                assert [x.index for x in out] == list(range(n)) * B
                handed.append(b)
    assert sorted(handed) == list(range(N))  # every batch exactly once
    assert buf.partials_received == partial
    taken = buf.take_partials(partial + 5)
    assert sorted(g[0].group_id for g in taken) == [B * N + p for p in range(partial)]


def test_late_or_extra_groups_are_refused_and_counted() -> None:
    buf = BatchBuffer(1)
    assert buf.add(sample(group_id=0, batch=0)) is None
    assert buf.add(sample(group_id=1, batch=0)) == "batch_full"
    buf.pop(0)
    assert buf.add(sample(group_id=2, batch=0)) == "batch_full"
    assert dict(buf.rejected) == {"batch_full": 2}
    with pytest.raises(ValueError, match="batch 1 holds 0/1"):
        buf.pop(1)


def test_buffer_filter_picks_cached_partials() -> None:
    buf = BatchBuffer(1)
    for g in range(4):
        buf.add(sample(group_id=g, batch=-1, reward=float(g)))
    newest_first = buf.take_partials(2, lambda groups, n: list(range(len(groups)))[::-1][:n])
    assert [g[0].group_id for g in newest_first] == [3, 2]
    assert [g[0].group_id for g in buf.take_partials(5)] == [0, 1]
    with pytest.raises(ValueError, match="buffer filter returned"):
        buf.add(sample(group_id=9, batch=-1))
        buf.take_partials(1, lambda groups, n: [0, 0])


def test_rollout_and_staleness_stats() -> None:
    xs = [
        sample(reward=1.0, n=2, versions=[3, 4]),
        sample(reward=0.0, n=4, status="truncated", versions=[1, 1, 4, 4], loss_mask=[0, 0, 1, 1]),
        sample(reward=0.0, n=2, versions=[2, 4]),
    ]
    stats = rollout_stats(xs)
    assert stats["rollout/reward_mean"] == pytest.approx(1 / 3) and stats[
        "rollout/accuracy"
    ] == pytest.approx(1 / 3)
    assert stats["rollout/truncated_frac"] == pytest.approx(1 / 3)
    st_ = staleness_stats(xs, version=4)
    # the masked-out tokens of version 1 do not count: staleness 1, 0 (trained tokens are version 4), 2
    assert st_["staleness/max"] == 2 and st_["staleness/hist_0"] == 1 and st_["staleness/hist_1"] == 1
    assert st_["staleness/mean"] == pytest.approx(1.0)


def test_buffer_actor_over_zeromq_survives_garbage() -> None:
    buffer = BufferActor(batch_size=2)
    try:
        ctx = zmq.Context()
        raw = ctx.socket(zmq.PUSH)
        raw.connect(buffer.address())
        raw.send(b"not a sample")

        async def push() -> None:
            sink = ZmqSampleSink(buffer.address())
            for g in (1, 0):
                for i in (1, 0):
                    await sink.send([sample(group_id=g, index=i, group_size=2, reward=float(g), batch=0)])
            await sink.send([sample(group_id=7, batch=-1)])
            sink.close()

        asyncio.run(push())
        samples, stats = buffer.get_batch(0, timeout_s=10)
        assert [(x.group_id, x.index) for x in samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert stats["rollout/reward_mean"] == 0.5 and stats["staleness/max"] == 0
        assert [g[0].group_id for g in buffer.take_partials(3, sent=1, timeout_s=10)] == [7]
        info = buffer.stats()
        assert info["invalid_frames"] == {"undecodable": 1} and info["accepted"] == 5
        with pytest.raises(TimeoutError):
            buffer.get_batch(1, timeout_s=0.2)
        raw.close()
        ctx.term()
    finally:
        buffer.close()
