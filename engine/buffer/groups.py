"""Group assembly and batch routing: samples arrive one by one, in any order; whole groups leave.

Guarantees: a group leaves only when all of its group_size samples are in; groups are never split or
mixed; a sample is never handed out twice; a duplicate or inconsistent sample is rejected and counted
with its reason, and never replaces one already accepted.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from collections.abc import Callable

from engine.wire import Sample

SAMPLE_OVERHEAD = 256  # bytes of a decoded Sample beyond its buffers and text (object headers)


def sample_bytes(sample: Sample) -> int:
    """Memory a held sample takes, approximately: its buffers, its text and a fixed overhead."""
    return (
        len(sample.prompt_ids)
        + 2 * len(sample.response_ids)
        + len(sample.versions)
        + len(sample.loss_mask)
        + len(sample.response_text)
        + SAMPLE_OVERHEAD
    )


def group_bytes(group: list[Sample]) -> int:
    return sum(map(sample_bytes, group))


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

    @property
    def pending_samples(self) -> int:
        """Samples of groups not complete yet."""
        return sum(map(len, self._partial.values()))

    def mark_complete(self, group_ids: set[int]) -> None:
        """Refuse any further sample of these groups (they were handed out before a rewind)."""
        self._done_groups |= group_ids

    def pop(self, num_groups: int) -> list[list[Sample]]:
        if num_groups > len(self._ready):
            raise ValueError(f"asked for {num_groups} groups, {len(self._ready)} ready")
        return [self._ready.popleft() for _ in range(num_groups)]


GroupFilter = Callable[[list[list[Sample]], int], list[int]]


class BatchBuffer:
    """Whole groups routed to the batch the producer assigned them, or to the partial-rollout cache.

    Guarantees: batch b is handed out once, when it holds exactly batch_size groups, ordered by group
    id; a group for a batch already handed out or already full is refused and counted; cached partial
    groups leave in arrival order (or as a buffer filter picks them), each once.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.assembler = GroupAssembler()
        self.batches: dict[int, list[list[Sample]]] = defaultdict(list)
        self.handed_out: set[int] = set()
        self.partials: list[list[Sample]] = []
        self.partials_received = 0
        self.rejected: Counter[str] = Counter()
        self.held_bytes = 0
        self.max_group_id = -1
        self.trained_groups: set[int] = set()  # group ids of the batches handed out

    def add(self, sample: Sample) -> str | None:
        """Take one sample; returns a rejection reason or None."""
        reason = self.assembler.add(sample)
        if reason is not None:
            return reason
        self.held_bytes += sample_bytes(sample)
        self.max_group_id = max(self.max_group_id, sample.group_id)
        for group in self.assembler.pop(self.assembler.ready_groups):
            reason = self._route(group)
        return reason

    def _route(self, group: list[Sample]) -> str | None:
        targets = {x.batch for x in group}
        if len(targets) != 1:
            return self._reject("mixed_batches", group)
        batch = targets.pop()
        if batch < 0:
            self.partials.append(group)
            self.partials_received += 1
            return None
        if batch in self.handed_out or len(self.batches[batch]) >= self.batch_size:
            return self._reject("batch_full", group)
        self.batches[batch].append(group)
        return None

    def _reject(self, reason: str, group: list[Sample]) -> str:
        self.rejected[reason] += len(group)
        self.held_bytes -= group_bytes(group)
        return reason

    def ready(self, batch: int) -> bool:
        return batch not in self.handed_out and len(self.batches.get(batch, ())) == self.batch_size

    def pop(self, batch: int) -> list[Sample]:
        if not self.ready(batch):
            raise ValueError(
                f"batch {batch} holds {len(self.batches.get(batch, ()))}/{self.batch_size} groups"
            )
        groups = sorted(self.batches.pop(batch), key=lambda g: g[0].group_id)
        self.handed_out.add(batch)
        self.trained_groups.update(g[0].group_id for g in groups)
        self.held_bytes -= sum(map(group_bytes, groups))
        return [x for g in groups for x in g]

    def take_partials(self, n: int, select: GroupFilter | None = None) -> list[list[Sample]]:
        """Up to n cached partial groups: the oldest first, or the indices a buffer filter returns."""
        if select is None:
            chosen = list(range(min(n, len(self.partials))))
        else:
            chosen = list(select(list(self.partials), n))
            if (
                len(set(chosen)) != len(chosen)
                or len(chosen) > n
                or not all(0 <= i < len(self.partials) for i in chosen)
            ):
                raise ValueError(
                    f"buffer filter returned {chosen!r}: "
                    f"expected at most {n} distinct indices below {len(self.partials)}"
                )
        taken = [self.partials[i] for i in chosen]
        self.partials = [g for i, g in enumerate(self.partials) if i not in set(chosen)]
        self.held_bytes -= sum(map(group_bytes, taken))
        return taken

    def restore_partials(self, groups: list[list[Sample]]) -> None:
        """Cached partial groups of a checkpoint (or of a restart), ahead of any cached since."""
        self.partials[:0] = groups
        self.held_bytes += sum(map(group_bytes, groups))

    def rewind(self, partials: list[list[Sample]]) -> int:
        """Forget everything not handed out (incomplete groups, held batches, cached partial groups) and
        hold `partials` as the cache; returns the number of samples forgotten. Groups of batches handed
        out stay refused as duplicates."""
        forgotten = sum(len(g) for groups in self.batches.values() for g in groups)
        forgotten += sum(len(g) for g in self.partials) + self.assembler.pending_samples
        old, self.assembler = self.assembler, GroupAssembler()
        self.assembler.accepted, self.assembler.rejected = old.accepted, old.rejected
        self.assembler.mark_complete(self.trained_groups)
        self.batches.clear()
        self.partials = []
        self.partials_received = 0
        self.held_bytes = 0
        self.restore_partials(partials)
        return forgotten
