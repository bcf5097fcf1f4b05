"""Group assembly: samples arrive one by one, in any order; whole groups leave in arrival order.

Guarantees: a group leaves only when all of its group_size samples are in; groups are never split or
mixed; a sample is never handed out twice; a duplicate or inconsistent sample is rejected and counted
with its reason, and never replaces one already accepted.
"""

from __future__ import annotations

from collections import Counter, deque

from engine.wire import Sample


class GroupAssembler:
    def __init__(self) -> None:
        self._partial: dict[int, dict[int, Sample]] = {}
        self._ready: deque[list[Sample]] = deque()
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self._done_groups: set[int] = set()

    def add(self, sample: Sample) -> str | None:
        """Take one sample; returns the rejection reason, or None when accepted."""
        gid = sample.group_id
        if gid in self._done_groups:
            return self._reject("group_already_complete")
        members = self._partial.setdefault(gid, {})
        if members:
            first = next(iter(members.values()))
            if first.group_size != sample.group_size:
                return self._reject("group_size_mismatch")
        if sample.index in members:
            return self._reject("duplicate_index")
        members[sample.index] = sample
        self.accepted += 1
        if len(members) == sample.group_size:
            del self._partial[gid]
            self._done_groups.add(gid)
            self._ready.append([members[i] for i in range(sample.group_size)])
        return None

    def _reject(self, reason: str) -> str:
        self.rejected[reason] += 1
        return reason

    @property
    def ready_groups(self) -> int:
        return len(self._ready)

    @property
    def partial_groups(self) -> int:
        return len(self._partial)

    def pop(self, num_groups: int) -> list[list[Sample]]:
        if num_groups > len(self._ready):
            raise ValueError(f"asked for {num_groups} groups, {len(self._ready)} ready")
        return [self._ready.popleft() for _ in range(num_groups)]
