"""What the producer must remember so that a run resumed from a checkpoint trains every prompt once.

At a checkpoint taken while the learner holds version v (batches 0..v-1 trained), every prompt the
producer has drawn (stream positions 0..P-1 of PromptOrder) is in exactly one of four states:
- trained: its group is in a batch below v;
- dropped: filtered by dynamic sampling, surplus and not cached, or cached and then too stale;
- cached: a partial group in the partial-rollout cache (or on its way there), taken back and waiting,
  or restarted and not yet in a trained batch (then the samples it was cached with are what is kept);
- pending: a new group still running, or finished into batch v or later (not trained yet).

`RolloutState` holds the pending groups (group id, stream position, prompt index), the cached groups'
samples, the prompt order's position, the next group id and the count of dropped groups. A producer
resumed from it starts the pending groups again first, under their own group ids and sampling seeds,
and the buffer gets the cached groups back. Guarantee: P = v x B + dropped + len(cached) + len(pending)
(B = rollout.batch_size) with the four sets disjoint, so a resumed run never trains a prompt of a
trained batch again and loses none of the others; what was generated for pending groups before the
checkpoint is generated again (identically in synchronous runs: same weights, ids and seeds).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.rollout.data import Prompt
from engine.transport import SampleSink
from engine.wire import Sample


@dataclass
class Response:
    """One response in the making: its tokens so far (with log-probs, versions, loss mask)."""

    seed: int
    budget: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" | "length" once done
    reward: float = 0.0
    text: str = ""


@dataclass
class Group:
    """One prompt's group of responses in the producer."""

    prompt: Prompt
    responses: list[Response]
    seq: int = -1
    rids: set[int] = field(default_factory=set)
    engine: int = -1
    position: int | None = None  # stream position of a new group (None: a restarted partial group)
    cached: list[Sample] | None = None  # the samples a restarted partial group was cached with
    batch: int | None = None  # the batch it went to, once finished and placed


def group_from_samples(samples: list[Sample], max_response_len: int, masked: bool) -> Group:
    """A cached partial group, to be restarted from its tokens (masked: its tokens leave the loss)."""
    first = samples[0]
    prompt = Prompt(
        index=first.prompt_index,
        token_ids=tuple(int(t) for t in first.prompt_array),
        text="",
        label=first.label,
        metadata=first.metadata,
    )  # responses keep their own seeds, so the prompt's stream position is not needed again
    responses = [
        Response(
            seed=x.seed,
            budget=max_response_len,
            tokens=x.response_array.tolist(),
            logprobs=x.logprob_array.tolist(),
            versions=x.version_array.tolist(),
            mask=[0] * x.response_len if masked else x.mask_array.tolist(),
            finish={"completed": "stop", "truncated": "length"}.get(x.status),
        )
        for x in samples
    ]
    return Group(prompt, responses, cached=samples)


class Pending(msgspec.Struct, array_like=True, frozen=True):
    seq: int
    position: int
    prompt_index: int


class RolloutState(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    version: int  # batches trained (the learner's policy version at the checkpoint)
    epoch: int  # PromptOrder position: the next new prompt
    offset: int
    next_seq: int  # the next group id
    dropped: int  # groups dropped since the start of training
    pending: list[Pending]
    cached: list[list[Sample]]
    # Prompt indices trained after the snapshot this state was advanced from (a producer restarted
    # mid-run): the next draw of each from the prompt order is skipped, once.
    skip: list[int] = msgspec.field(default_factory=list)


def encode_state(state: RolloutState) -> bytes:
    return msgspec.msgpack.encode(state)


def decode_state(data: bytes) -> RolloutState:
    return msgspec.msgpack.decode(data, type=RolloutState)


class Progress:
    """The producer's account of groups not settled yet (see the module docstring).

    Every method is synchronous: called between two awaits of the producer's event loop, so that a
    snapshot (also synchronous) always sees each group in exactly one state.
    """

    def __init__(self, dropped: int = 0, cached: Iterable[list[Sample]] = ()) -> None:
        self.dropped = dropped
        self.open: dict[int, Group] = {}  # admitted, not trained, dropped or cached
        self.cache: dict[int, list[Sample]] = {s[0].group_id: s for s in cached}  # by cached group id

    def opened(self, group: Group) -> None:
        self.open[group.seq] = group

    def assigned(self, group: Group, batch: int) -> None:
        group.batch = batch  # open until the learner has trained that batch

    def drop(self, group: Group | None = None) -> None:
        if group is not None:
            self.open.pop(group.seq, None)
        self.dropped += 1

    def set_aside(self, group: Group, samples: list[Sample]) -> None:
        self.open.pop(group.seq, None)
        self.cache[samples[0].group_id] = samples

    def taken(self, samples: list[Sample]) -> None:
        """A cached group left the buffer (the producer holds it now, as a group with `cached` set)."""
        self.cache.pop(samples[0].group_id, None)

    def advance(self, version: int) -> None:
        """Batches below version are trained: their groups are settled."""
        for seq in [s for s, g in self.open.items() if g.batch is not None and g.batch < version]:
            del self.open[seq]

    def snapshot(
        self,
        *,
        version: int,
        epoch: int,
        offset: int,
        next_seq: int,
        held: Iterable[Group],
        waiting: Iterable[Pending],
    ) -> RolloutState:
        """The state to resume from at version (held: cached groups taken back and not restarted yet;
        waiting: pending groups of the checkpoint this run resumed from, not restarted yet)."""
        self.advance(version)
        groups = sorted(self.open.values(), key=lambda g: g.seq)
        pending = [Pending(g.seq, g.position, g.prompt.index) for g in groups if g.position is not None]
        pending = sorted([*pending, *waiting], key=lambda p: p.seq)
        cached = [g.cached for g in [*groups, *held] if g.position is None and g.cached is not None]
        return RolloutState(
            version=version,
            epoch=epoch,
            offset=offset,
            next_seq=next_seq,
            dropped=self.dropped,
            pending=pending,
            cached=[*cached, *self.cache.values()],
        )


class PartialStore(abc.ABC):
    """Where partial groups wait between rounds (the buffer): put a group's samples, take groups back."""

    def __init__(self, sink: SampleSink) -> None:
        self.sink = sink
        self.sent = 0

    async def put(self, samples: list[Sample]) -> None:
        await self.sink.send(samples)
        self.sent += 1

    @abc.abstractmethod
    async def take(self, n: int) -> list[list[Sample]]:
        """Up to n cached groups, once every group put so far has arrived."""


class RayPartialStore(PartialStore):
    """The buffer actor's partial-rollout cache, fed through the sample stream."""

    def __init__(self, sink: SampleSink, buffer: Any) -> None:
        super().__init__(sink)
        self.buffer = buffer

    async def take(self, n: int) -> list[list[Sample]]:
        return await self.buffer.take_partials.remote(n, self.sent)
