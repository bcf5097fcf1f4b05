"""Property tests of admission control and batch assignment over random interleavings.

A simulated run: groups are admitted while capacity allows, finish in random order (kept or filtered),
surplus groups are aborted, the learner consumes batch v once it is full and bumps the version. Each
group's tokens carry versions between its start and its finish. Whatever the interleaving:
staleness never exceeds k, every batch gets exactly B groups, every finished group is in exactly one
batch or counted once under a reason, and a fair schedule always completes the run.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.buffer.groups import BatchBuffer
from engine.rollout.scheduler import BatchScheduler
from engine.wire import Sample
from tests.helpers import sample


class Sim:
    def __init__(self, B: int, k: int, N: int, over: int) -> None:
        self.s = BatchScheduler(B, k, N, over)
        self.B, self.k, self.N = B, k, N
        self.start: dict[int, int] = {}
        self.token_versions: dict[int, tuple[int, int]] = {}
        self.batches: dict[int, list[int]] = {b: [] for b in range(N)}
        self.outcome: dict[int, str] = {}
        self.surplus_seen: set[int] = set()

    def admit(self) -> bool:
        if self.s.capacity() <= 0:
            return False
        seq = self.s.admit()
        self.start[seq] = self.s.version
        return True

    def finish(self, index: int, keep: bool) -> bool:
        if not self.s.running:
            return False
        seq = sorted(self.s.running)[index % len(self.s.running)]
        surplus = self.s.running[seq].state == "surplus"
        # tokens come from any version between admission and now
        self.token_versions[seq] = (self.start[seq], self.s.version)
        batch = self.s.finish(seq, keep=keep, reason="filtered")
        if batch is not None:
            assert not surplus
            self.batches[batch].append(seq)
            self.outcome[seq] = "batch"
        else:
            self.outcome[seq] = "surplus" if surplus or keep else "filtered"
        self.surplus_seen.update(self.s.surplus())
        return True

    def consume(self) -> bool:
        v = self.s.version
        if v >= self.N or not self.s.batch_full(v):
            return False
        for seq in self.batches[v]:
            oldest = self.token_versions[seq][0]
            assert v - oldest <= self.k, f"group {seq} started at {oldest}, trained at {v}"
        self.s.set_version(v + 1)
        self.surplus_seen.update(self.s.surplus())
        return True

    def drain(self, budget: int = 10_000) -> None:
        """A fair schedule: finish the oldest running group (kept), consume when full, admit when allowed."""
        for _ in range(budget):
            if self.s.done:
                return
            if self.consume() or self.admit():
                continue
            assert self.finish(0, keep=True), "stuck: nothing runs, nothing can start, batch not full"
        raise AssertionError("fair schedule did not finish")

    def check(self) -> None:
        for b, seqs in self.batches.items():
            assert len(seqs) <= self.B
            for seq in seqs:
                assert self.start[seq] <= b <= self.start[seq] + self.k
        placed = [seq for seqs in self.batches.values() for seq in seqs]
        assert len(placed) == len(set(placed))  # never in two batches
        finished = set(self.outcome)
        assert finished == set(placed) | {s for s, o in self.outcome.items() if o != "batch"}
        assert sum(self.s.dropped.values()) == sum(1 for o in self.outcome.values() if o == "filtered")


sizes = st.tuples(st.integers(1, 4), st.integers(0, 3), st.integers(1, 6), st.integers(0, 4))


@settings(max_examples=300, deadline=None)
@given(
    sizes,
    st.lists(
        st.tuples(st.sampled_from(["admit", "finish", "consume"]), st.integers(0, 50), st.booleans()),
        max_size=150,
    ),
)
def test_random_interleavings_keep_every_guarantee(size, actions) -> None:
    B, k, N, extra = size
    sim = Sim(B, k, N, B + extra)
    for action, index, keep in actions:
        if action == "admit":
            sim.admit()
        elif action == "finish":
            sim.finish(index, keep)
        else:
            sim.consume()
        sim.check()
    sim.drain()
    sim.check()
    assert all(len(sim.batches[b]) == B for b in range(N))
    assert sim.s.version == N - 1 or sim.consume() or sim.s.version == N


@settings(max_examples=100, deadline=None)
@given(sizes)
def test_without_over_sampling_and_filtering_nothing_is_surplus(size) -> None:
    B, k, N, _ = size
    sim = Sim(B, k, N, B)
    sim.drain()
    assert not sim.surplus_seen and set(sim.outcome.values()) == {"batch"}


def test_sync_admits_one_batch_per_version() -> None:
    s = BatchScheduler(batch_size=3, max_staleness=0, num_batches=2)
    seqs = [s.admit() for _ in range(3)]
    assert s.capacity() == 0  # k = 0: the next batch waits for the next version
    assert [s.finish(q) for q in seqs] == [0, 0, 0]
    assert s.capacity() == 0
    s.set_version(1)
    assert s.capacity() == 3


def test_capacity_formula() -> None:
    B, k = 4, 2
    s = BatchScheduler(B, k, num_batches=100)
    assert s.capacity() == (k + 0 + 1) * B
    running = [s.admit() for _ in range(5)]
    s.finish(running[0])
    assert s.capacity() == (k + 0 + 1) * B - (1 + 4)  # (k + v + 1) B - (accepted + running)


def test_finished_groups_leave_room_for_running_ones() -> None:
    # k = 1, B = 1: g0 runs long; g2, started later, finishes first and must not take g0's last slot.
    s = BatchScheduler(batch_size=1, max_staleness=1, num_batches=3)
    g0, g1 = s.admit(), s.admit()
    assert s.finish(g1) == 0
    s.set_version(1)
    g2 = s.admit()
    assert s.finish(g2) == 2
    assert s.finish(g0) == 1 and s.surplus() == []


def test_over_sampling_marks_the_rest_surplus_when_the_batch_is_full() -> None:
    s = BatchScheduler(batch_size=2, max_staleness=0, num_batches=1, over_sampling=4)
    seqs = [s.admit() for _ in range(4)]
    assert s.capacity() == 0
    assert s.finish(seqs[2], keep=False, reason="zero_std") is None
    assert s.capacity() == 1  # a filtered group frees room for another
    s.finish(seqs[0])
    s.finish(seqs[3])
    assert s.surplus() == [seqs[1]]
    assert s.finish(seqs[1]) is None and s.done
    assert s.dropped == {"zero_std": 1}


def test_would_starve() -> None:
    s = BatchScheduler(batch_size=2, max_staleness=0, num_batches=1, over_sampling=3)
    a, b, c = (s.admit() for _ in range(3))
    assert not s.would_starve(a)  # b and c can still fill the batch
    s.finish(a, keep=False)
    assert s.would_starve(b)  # without b the batch would wait for a group not yet started
    assert s.finish(b) == 0
    assert s.would_starve(c)


def test_version_cannot_pass_an_unfilled_batch() -> None:
    s = BatchScheduler(batch_size=2, max_staleness=1, num_batches=3)
    s.finish(s.admit())
    with pytest.raises(RuntimeError, match="batch 0 holds 1/2"):
        s.set_version(1)


def test_a_group_is_never_placed_after_its_window() -> None:
    # Over-sampled sync run: the batch fills while two more groups run; one finishes before anyone
    # marked it surplus. It must not spill into a later batch (its tokens are from version 0).
    s = BatchScheduler(batch_size=1, max_staleness=0, num_batches=3, over_sampling=3)
    g0, g1, g2 = (s.admit() for _ in range(3))
    assert s.finish(g0) == 0
    assert s.finish(g1) is None and s.groups[g1].state == "surplus"
    assert s.surplus() == [g2]


class PipelineSim:
    """Admission control and the buffer together: finished groups become samples (token versions
    anywhere between the group's start and its end) that reach the buffer in a random order."""

    def __init__(self, B: int, k: int, N: int, over: int, n: int, rng) -> None:
        self.s = BatchScheduler(B, k, N, over)
        self.buf = BatchBuffer(B)
        self.B, self.k, self.N, self.n, self.rng = B, k, N, n, rng
        self.start: dict[int, int] = {}
        self.in_flight: list[Sample] = []
        self.counted: dict[int, str] = {}  # group -> reason it is not trained
        self.trained: dict[int, int] = {}  # group -> batch it was trained in
        self.sent: dict[int, int] = {}  # group -> assigned batch

    def admit(self) -> bool:
        if self.s.capacity() <= 0:
            return False
        seq = self.s.admit()
        self.start[seq] = self.s.version
        return True

    def finish(self, pick: int, keep: bool) -> bool:
        if not self.s.running:
            return False
        seq = sorted(self.s.running)[pick % len(self.s.running)]
        surplus = self.s.running[seq].state == "surplus"
        batch = self.s.finish(seq, keep=keep, reason="zero_std")
        if batch is None:
            self.counted[seq] = "surplus" if surplus or keep else "zero_std"
        else:
            self.sent[seq] = batch
            for i in range(self.n):
                versions = [self.rng.randint(self.start[seq], self.s.version) for _ in range(3)]
                self.in_flight.append(
                    sample(group_id=seq, index=i, group_size=self.n, batch=batch, versions=versions)
                )
        return True

    def mark_surplus(self) -> bool:
        """The producer marks (and aborts) surplus groups after its other work: any delay is possible."""
        return bool(self.s.surplus())

    def abort(self, pick: int) -> bool:
        live = [q for q, g in self.s.running.items() if g.state == "running"]
        if not live:
            return False
        seq = live[pick % len(live)]
        self.s.abort_running(seq, "engine_failed")
        self.counted[seq] = "engine_failed"
        return True

    def deliver(self, pick: int) -> bool:
        if not self.in_flight:
            return False
        assert self.buf.add(self.in_flight.pop(pick % len(self.in_flight))) is None
        return True

    def consume(self) -> bool:
        v = self.s.version
        if v >= self.N or not self.buf.ready(v):
            return False
        assert self.s.batch_full(v)
        batch = self.buf.pop(v)
        groups = {x.group_id for x in batch}
        assert len(batch) == self.B * self.n and len(groups) == self.B  # whole groups, B of them
        for x in batch:
            assert v - int(x.version_array.min()) <= self.k, "a trained token is too stale"
            assert x.group_id not in self.trained or self.trained[x.group_id] == v
            self.trained[x.group_id] = v
        self.s.set_version(v + 1)
        return True

    def drain(self) -> None:
        for _ in range(100_000):
            if self.s.version >= self.N and not self.s.running and not self.in_flight:
                return
            if (
                self.deliver(0)
                or self.consume()
                or self.admit()
                or self.mark_surplus()
                or self.finish(0, keep=True)
            ):
                continue
            raise AssertionError("stuck")
        raise AssertionError("did not finish")


@settings(max_examples=600, deadline=None)
@given(
    st.tuples(st.integers(1, 3), st.integers(0, 3), st.integers(1, 5), st.integers(0, 3), st.integers(1, 3)),
    st.lists(
        st.tuples(
            st.sampled_from(["admit", "finish", "abort", "deliver", "consume"]),
            st.integers(0, 99),
            st.booleans(),
        ),
        min_size=10,
        max_size=200,
    ),
    st.randoms(use_true_random=False),
)
def test_admission_and_buffer_under_random_arrivals_aborts_and_version_bumps(size, actions, rng) -> None:
    B, k, N, extra, n = size
    sim = PipelineSim(B, k, N, B + extra, n, rng)
    for action, pick, keep in actions:
        if action == "admit":
            sim.admit()
        elif action == "finish":
            sim.finish(pick, keep)
        elif action == "abort":
            sim.abort(pick)
        elif action == "deliver":
            sim.deliver(pick)
        elif action == "mark":
            sim.mark_surplus()
        else:
            sim.consume()
    sim.drain()
    # every finished group is trained in exactly its assigned batch, or counted once under a reason
    assert set(sim.trained) == set(sim.sent) and all(sim.trained[g] == b for g, b in sim.sent.items())
    assert not set(sim.trained) & set(sim.counted)
    assert sorted(set(sim.trained) | set(sim.counted)) == sorted(sim.start)
    assert sim.s.dropped["engine_failed"] == sum(1 for r in sim.counted.values() if r == "engine_failed")
