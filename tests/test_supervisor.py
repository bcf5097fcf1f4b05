"""Where a restarted producer starts: a boundary state advanced past the batches trained since."""

from __future__ import annotations

import pytest

from engine.rollout.progress import Pending, RolloutState, encode_state
from engine.supervisor import RolloutLog, advance_state
from tests.helpers import sample


def state() -> RolloutState:
    """At version 2 (8 groups trained, B = 4): 3 pending groups (ids 8-10) and 2 cached (prompts 50, 51);
    positions 0..13 drawn (8 trained + 1 dropped + 3 pending + 2 cached)."""
    return RolloutState(
        version=2,
        epoch=0,
        offset=14,
        next_seq=13,
        dropped=1,
        pending=[Pending(8, 9, 40), Pending(9, 10, 41), Pending(10, 11, 42)],
        cached=[[sample(11, prompt_index=50)], [sample(12, prompt_index=51)]],
    )


def test_trained_groups_leave_pending_and_cached_and_new_draws_are_skipped() -> None:
    # batch 2: pending 8 and 10, cached prompt 51 resumed as group 14, a new draw (prompt 60, group 13);
    # pending 9 was cached and resumed as group 15 (prompt 41) in batch 3 with new draws 61, 62, 63.
    trained = [(8, 40), (10, 42), (14, 51), (13, 60), (15, 41), (16, 61), (17, 62), (18, 63)]
    s = advance_state(state(), trained, 4, next_seq=19)
    assert s.version == 4 and s.next_seq == 19 and (s.epoch, s.offset, s.dropped) == (0, 14, 1)
    assert s.pending == [] and [g[0].prompt_index for g in s.cached] == [50]
    assert s.skip == [60, 61, 62, 63]


def test_log_needs_every_batch_since_the_boundary() -> None:
    log = RolloutLog()
    log.boundary(encode_state(state()))
    log.trained(2, [8, 9, 10, 13], [40, 41, 42, 60])
    with pytest.raises(RuntimeError, match=r"batches \[3\] were not recorded"):
        log.state_at(4, 0)
    s = log.state_at(3, 0)
    assert [p.seq for p in s.pending] == [] and s.skip == [60] and len(s.cached) == 2
    log.boundary(encode_state(s))  # a newer boundary drops the batches below it
    assert log.batches == {}
