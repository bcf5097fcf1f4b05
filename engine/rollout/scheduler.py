"""Admission control and batch assignment with bounded staleness: the producer's bookkeeping, pure.

Batches are numbered 0..N-1; batch b is trained when the learner holds policy version b, so a group
whose oldest trained token comes from version s may go into batches s..s+k only (k = max_staleness).
Guarantees, whatever the order in which groups finish:
- admission: a group starts only while capacity = (k + v + 1) B - (accepted + running) > 0 (plus the
  over-sampling slack O - B) and its window still has a free slot;
- safety: a finished group is placed only in a batch of its window, so a trained token is never more
  than k versions stale; a group that no longer fits is *surplus* (aborted if still running, and then
  kept for partial rollout or dropped), never placed late;
- each batch receives exactly B groups, and every finished group ends in exactly one batch or is
  counted once under a reason;
- liveness: finished groups take the earliest batch that leaves room for the groups still running
  (earliest-deadline-first), so running groups are not crowded out of their windows;
- resume: after `resume_at(v, next_seq)` batches below v count as trained and full, and group ids
  continue from next_seq; `admit(seq=...)` restarts a group pending at the checkpoint under its own id.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

_FOREVER = 1 << 62


@dataclass
class Group:
    seq: int
    base_version: int  # oldest policy version whose tokens this group will train on
    deadline: int  # last batch it may join: base_version + k
    state: str = "running"  # running | assigned | dropped | surplus
    batch: int | None = None


class BatchScheduler:
    def __init__(
        self, batch_size: int, max_staleness: int, num_batches: int, over_sampling: int | None = None
    ):
        if over_sampling is not None and over_sampling < batch_size:
            raise ValueError("over_sampling must be >= batch_size")
        self.B, self.k, self.N = batch_size, max_staleness, num_batches
        self.slack = (over_sampling or batch_size) - batch_size
        self.version = 0
        self.filled = [0] * num_batches
        self.groups: dict[int, Group] = {}
        self.running: dict[int, Group] = {}
        self.dropped: Counter[str] = Counter()
        self._next_seq = 0
        self._full = 0  # batches holding B groups

    @property
    def next_seq(self) -> int:
        """The id the next new group gets."""
        return self._next_seq

    def resume_at(self, version: int, next_seq: int) -> None:
        """Continue a run from a checkpoint: batches below version were trained (full) in an earlier run,
        and group ids up to next_seq were given out there."""
        if not 0 <= version <= self.N:
            raise ValueError(f"version {version} is outside 0..{self.N}")
        self.version, self._next_seq = version, next_seq
        self.filled[:version] = [self.B] * version
        self._full = version

    # --- slots --------------------------------------------------------------------------------------

    def _last(self, deadline: int) -> int:
        return min(deadline, self.N - 1)

    def free(self, upto: int) -> int:
        """Free slots in the open batches version..upto."""
        return sum(self.B - self.filled[b] for b in range(self.version, self._last(upto) + 1))

    def _running_upto(self, deadline: int, exclude: int | None = None) -> int:
        """Running groups (not surplus) that need a slot in a batch <= deadline."""
        return sum(
            1
            for g in self.running.values()
            if g.state == "running" and g.deadline <= deadline and g.seq != exclude
        )

    @property
    def done(self) -> bool:
        """Every batch is full and nothing runs."""
        return self._full == self.N and not self.running

    # --- admission ----------------------------------------------------------------------------------

    def capacity(self, base_version: int | None = None) -> int:
        """Groups that may start now: (k + v + 1) B - (accepted + running), within the batches left,
        plus the over-sampling slack; 0 when the new group's window has no free slot."""
        deadline = self.k + (self.version if base_version is None else base_version)
        if deadline < self.version or self.version >= self.N:
            return 0
        free = self.free(deadline)
        if free == 0:
            return 0
        return max(0, free + self.slack - len(self.running))

    def admit(self, base_version: int | None = None, seq: int | None = None) -> int:
        """Start a group (base_version: the version of its oldest trained token; default now). seq: the
        group id of a group pending at the checkpoint this run resumed from (default: the next one)."""
        base = self.version if base_version is None else base_version
        if self.capacity(base) <= 0:
            raise RuntimeError("no capacity")
        if seq is None:
            seq = self._next_seq
            self._next_seq += 1
        elif seq in self.groups or seq >= self._next_seq:
            raise ValueError(f"group id {seq} is taken or not yet issued")
        group = Group(seq, base, base + self.k)
        self.groups[seq] = group
        self.running[seq] = group
        return seq

    # --- completion ---------------------------------------------------------------------------------

    def would_starve(self, seq: int) -> bool:
        """Dropping this finished group would leave the current batch waiting for groups not yet started."""
        if self.version >= self.N:
            return False
        return self.B - self.filled[self.version] > self._running_upto(_FOREVER, exclude=seq)

    def finish(self, seq: int, keep: bool = True, reason: str = "") -> int | None:
        """A group finished: its batch, or None when it is dropped (not kept) or surplus."""
        group = self.running.pop(seq)
        if group.state == "surplus":
            return None
        if not keep:
            group.state = "dropped"
            self.dropped[reason or "filtered"] += 1
            return None
        batch = self._place(group)
        if batch is None:
            group.state = "surplus"
            return None
        group.state, group.batch = "assigned", batch
        self.filled[batch] += 1
        self._full += self.filled[batch] == self.B
        return batch

    def _place(self, group: Group) -> int | None:
        window = [b for b in range(self.version, self._last(group.deadline) + 1) if self.filled[b] < self.B]
        # Beyond the last running deadline the check cannot fail (free slots only grow with d).
        horizon = max((g.deadline for g in self.running.values()), default=self.version)
        for b in window:  # earliest batch that leaves room for the running groups' windows
            if all(
                self.free(d) - 1 >= self._running_upto(d, exclude=group.seq) - self.slack
                for d in range(b, self._last(max(horizon, b)) + 1)
            ):
                return b
        return window[-1] if window else None  # over-subscribed: finished work takes the latest slot

    def abort_running(self, seq: int, reason: str) -> None:
        """A running group leaves without finishing (engine failure, shutdown): counted under reason."""
        group = self.running.pop(seq)
        group.state = "dropped"
        self.dropped[reason] += 1

    def surplus(self) -> list[int]:
        """Running groups that can no longer be placed (to abort), latest admitted first.

        A group is surplus when its window has no free slot left, or when more running groups compete
        for a window's slots than the over-sampling slack allows.
        """
        out: list[int] = []
        live = sorted(
            (g for g in self.running.values() if g.state == "running"), key=lambda g: (g.deadline, g.seq)
        )
        for g in live:
            if self.free(g.deadline) == 0:
                out.append(g.seq)
        remaining = [g for g in live if g.seq not in out]
        for d in sorted({g.deadline for g in remaining}):
            competing = [g for g in remaining if g.deadline <= d and g.seq not in out]
            excess = len(competing) - self.free(d) - self.slack
            if excess > 0:
                out += [g.seq for g in sorted(competing, key=lambda g: -g.seq)[:excess]]
        for seq in out:
            self.running[seq].state = "surplus"
        return sorted(set(out), reverse=True)

    # --- versions -----------------------------------------------------------------------------------

    def batch_full(self, batch: int) -> bool:
        return self.filled[batch] == self.B

    def set_version(self, version: int) -> None:
        """The learner consumed batches < version (each was full) and now holds that version."""
        for b in range(self.version, min(version, self.N)):
            if self.filled[b] != self.B:
                raise RuntimeError(f"version {version} but batch {b} holds {self.filled[b]}/{self.B} groups")
        self.version = version
