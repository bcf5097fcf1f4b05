"""Where a restarted producer starts: the last version boundary's rollout state, advanced past the batches
trained since.

The producer returns its state (a RolloutState, engine/rollout/progress.py) at every weight push; the
controller records the groups of every batch it takes from the buffer. When the producer (or the
buffer) dies, `RolloutLog.state_at(v)` gives the state at the learner's version v: the last boundary's
state with every group trained since settled. Guarantee (with the buffer rewound to v, so nothing the
dead producer sent after the boundary is kept): a producer resumed from it trains each prompt of the
stream exactly once, as a checkpoint resume does. Groups of the trained batches that were pending or
cached at the boundary leave those lists; the others were new draws after it, and their prompt
indices become `skip`: the restarted producer passes over the next draw of each.
"""

from __future__ import annotations

from collections import Counter

import msgspec

from engine.rollout.progress import RolloutState, decode_state


def advance_state(
    state: RolloutState, trained: list[tuple[int, int]], version: int, next_seq: int
) -> RolloutState:
    """`state` (at state.version) moved to `version`, given (group id, prompt index) of every group of
    the batches state.version .. version - 1; group ids continue from at least next_seq."""
    by_seq = {p.seq for p in state.pending}
    pending = [p for p in state.pending if p.seq not in {g for g, _ in trained}]
    rest = Counter(prompt for gid, prompt in trained if gid not in by_seq)
    kept_pending = []
    for p in pending:  # a pending group cached and resumed under a new id since
        if rest[p.prompt_index] > 0:
            rest[p.prompt_index] -= 1
        else:
            kept_pending.append(p)
    cached = []
    for group in state.cached:  # a cached group resumed (under a new id) and trained since
        if rest[group[0].prompt_index] > 0:
            rest[group[0].prompt_index] -= 1
        else:
            cached.append(group)
    return msgspec.structs.replace(
        state,
        version=version,
        next_seq=max(state.next_seq, next_seq),
        pending=kept_pending,
        cached=cached,
        skip=sorted([*state.skip, *rest.elements()]),
    )


class RolloutLog:
    """The controller's record: the last boundary's state and the batches trained after it."""

    def __init__(self, state: RolloutState | None = None) -> None:
        self.state = state
        self.batches: dict[int, list[tuple[int, int]]] = {}

    def boundary(self, encoded: bytes | None) -> None:
        """The producer's state at a new boundary (None: not taken)."""
        if encoded is None:
            return
        self.state = decode_state(encoded)
        self.batches = {b: g for b, g in self.batches.items() if b >= self.state.version}

    def trained(self, batch: int, group_ids: list[int], prompt_indices: list[int]) -> None:
        self.batches[batch] = list(zip(group_ids, prompt_indices, strict=True))

    def state_at(self, version: int, next_seq: int) -> RolloutState:
        if self.state is None:
            raise RuntimeError("no rollout state recorded yet: the producer cannot be restarted")
        missing = [b for b in range(self.state.version, version) if b not in self.batches]
        if missing:
            raise RuntimeError(f"batches {missing} were not recorded: the producer cannot be restarted")
        trained = [g for b in range(self.state.version, version) for g in self.batches[b]]
        return advance_state(self.state, trained, version, next_seq)
