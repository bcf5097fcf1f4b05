"""The rollout producer: prompts in, scored samples out, under admission control.

It runs on uvloop in its own thread inside a Ray actor (engine/rollout/producer_actor.py). Guarantees:
- a group starts only when the BatchScheduler admits it (capacity = (k + v + 1) B - (accepted +
  running), plus over-sampling slack), and goes to a batch of its staleness window or nowhere;
- every response token keeps the policy version that produced it; a request cut by a weight update
  ("resume" mode) resumes from prompt + its tokens with the remaining budget and the same seed stream,
  its earlier tokens, log-probs and versions intact;
- a finished group is sent (to its batch) or counted under a reason; a surplus group (its batch filled
  first) is aborted and cached for partial rollout or counted as dropped; cached groups resume first;
- any failure (engine, reward, filter, socket) ends `run` with that error;
- `snapshot` at a version boundary gives what a resumed producer needs to train every prompt of the
  stream once (engine/rollout/progress.py), and a producer built with `resume=` continues from it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

import msgspec
import numpy as np

from engine.rollout.config import EvalConfig, RolloutConfig
from engine.rollout.data import Prompt, PromptOrder
from engine.rollout.engines import InferenceEngine
from engine.rollout.eval_metrics import eval_set_metrics
from engine.rollout.filters import resolve_filter, verdict
from engine.rollout.progress import (
    Group,
    PartialStore,
    Pending,
    Progress,
    RayPartialStore,
    Response,
    RolloutState,
    group_from_samples,
)
from engine.rollout.rewards import RewardPool
from engine.rollout.sampling import derive_seed
from engine.rollout.scheduler import BatchScheduler
from engine.transport import SampleSink
from engine.wire import GenerateRequest, Sample, SamplingParams

STATUS = {"stop": "completed", "length": "truncated", None: "aborted"}
TRAIN, EVAL = 1, 2  # seed domains
T = TypeVar("T")
__all__ = ["Group", "PartialStore", "Producer", "RayPartialStore", "Response"]


async def gather_all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Results in order; on the first failure the others are cancelled and that failure is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except ExceptionGroup as eg:
        raise eg.exceptions[0] from eg
    return [t.result() for t in tasks]


class Producer:
    """The asyncio core; create and use it inside one event loop."""

    def __init__(
        self,
        rollout: RolloutConfig,
        evaluation: EvalConfig,
        tokenizer: Any,
        prompts: list[Prompt],
        eval_sets: dict[str, list[Prompt]],
        engines: list[InferenceEngine],
        sink: SampleSink,
        rewards: RewardPool,
        *,
        num_batches: int,
        partials: PartialStore | None = None,
        resume: RolloutState | None = None,
        rid_start: int = 0,
    ) -> None:
        self.cfg, self.eval_cfg = rollout, evaluation
        self.tokenizer = tokenizer
        self.prompts, self.eval_sets = prompts, eval_sets
        self.engines, self.sink, self.rewards, self.partials = engines, sink, rewards, partials
        self.scheduler = BatchScheduler(
            rollout.batch_size, rollout.max_staleness, num_batches, rollout.over_sampling_batch_size
        )
        self.filter = resolve_filter(rollout.dynamic_sampling_filter, rollout.dynamic_sampling_filter_path)
        self.order = PromptOrder(len(prompts), shuffle=rollout.shuffle, seed=rollout.seed)
        stops = tuple(sorted({*rollout.stop_token_ids, tokenizer.eos_token_id} - {None}))
        self.train_params = SamplingParams(
            max_new_tokens=rollout.max_response_len,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            top_k=rollout.top_k,
            stop_token_ids=stops,
        )
        e = evaluation
        self.eval_params = SamplingParams(
            max_new_tokens=e.max_response_len or rollout.max_response_len,
            temperature=rollout.temperature if e.temperature is None else e.temperature,
            top_p=rollout.top_p if e.top_p is None else e.top_p,
            top_k=rollout.top_k if e.top_k is None else e.top_k,
            stop_token_ids=stops,
        )
        self.counts: Counter[str] = Counter()
        self.capacity_wait_s = 0.0
        self._groups: dict[int, Group] = {}
        self._held: deque[Group] = deque()  # partial groups taken back, waiting for room
        self._changed = asyncio.Event()
        self._max_groups = max(1, rollout.max_concurrency // rollout.n_samples_per_prompt)
        self._rids = itertools.count(rid_start)  # a restarted producer's ids differ from its predecessor's
        self._skip: Counter[int] = Counter()
        self._in_flight = [0] * len(engines)
        self.progress = Progress()
        self._pending: deque[Pending] = deque()
        self.start_version = 0
        if resume is not None:
            self._restore(resume)

    def _restore(self, state: RolloutState) -> None:
        """Continue from a checkpoint: the prompt order's position, group ids, pending groups first (the
        cached ones are back in the buffer)."""
        order = self.order
        self.order = PromptOrder(
            order.size, shuffle=order.shuffle, seed=order.seed, epoch=state.epoch, offset=state.offset
        )
        self.scheduler.resume_at(state.version, state.next_seq)
        self.start_version = state.version
        self.progress = Progress(state.dropped, state.cached)
        self._pending.extend(state.pending)
        self._skip.update(state.skip)
        self.counts["partials_restored"] = len(state.cached)
        self.counts["groups_pending_restored"] = len(state.pending)

    def snapshot(self, version: int) -> RolloutState:
        """What a resumed run needs, at the boundary where the learner holds `version`."""
        if version != self.version:
            raise RuntimeError(f"snapshot at version {version}, but the producer is at {self.version}")
        state = self.progress.snapshot(
            version=version,
            epoch=self.order.epoch,
            offset=self.order.offset,
            next_seq=self.scheduler.next_seq,
            held=self._held,
            waiting=self._pending,
        )
        state.skip = sorted(self._skip.elements())
        return state

    # --- versions and admission ---------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.scheduler.version

    async def set_version(self, version: int) -> None:
        self.scheduler.set_version(version)
        self.progress.advance(version)
        await self._abort_surplus()
        self._changed.set()

    async def _abort_surplus(self) -> None:
        for seq in self.scheduler.surplus():
            group = self._groups.get(seq)
            if group is not None and group.rids:
                await self.engines[group.engine].abort(sorted(group.rids))

    def _new_group(self) -> Group:
        """Admit the next prompt's group: the checkpoint's pending groups first (their own group ids,
        positions and seeds), then the prompt order's next."""
        seq = None
        if self._pending:
            p = self._pending.popleft()
            seq, position, index = p.seq, p.position, p.prompt_index
        else:
            position, index = self.order.next()
            while self._skip[index] > 0:  # trained after the snapshot a restarted producer came from
                self._skip[index] -= 1
                self.counts["prompts_skipped_trained"] += 1
                position, index = self.order.next()
        n = self.cfg.n_samples_per_prompt
        seeds = [derive_seed(self.cfg.seed, TRAIN, position, i) for i in range(n)]
        responses = [Response(seed=s, budget=self.cfg.max_response_len) for s in seeds]
        group = Group(self.prompts[index], responses, position=position)
        group.seq = self.scheduler.admit(seq=seq)
        return group

    async def _resumable(self, room: int) -> None:
        """Take cached partial groups back from the buffer (oldest first, or as the buffer filter picks)."""
        store, c = self.partials, self.counts
        if store is None or room <= 0 or c["partials_cached"] + c["partials_restored"] <= c["partials_taken"]:
            return
        for samples in await store.take(room):
            self.counts["partials_taken"] += 1
            self.progress.taken(samples)
            self._held.append(
                group_from_samples(
                    samples, self.cfg.max_response_len, self.cfg.mask_offpolicy_in_partial_rollout
                )
            )

    def _base_version(self, group: Group) -> int | None:
        """Oldest version among the tokens this group will train on (None: none yet, i.e. now)."""
        trained = [v for r in group.responses for v, m in zip(r.versions, r.mask, strict=True) if m]
        return min(trained) if trained else None

    async def run(self) -> dict[str, int]:
        """Start groups as the scheduler admits them until every batch is full; raise on any failure."""
        try:
            async with asyncio.TaskGroup() as tasks:
                while not self.scheduler.done:
                    started = await self._admit_next()
                    if started is not None:
                        tasks.create_task(self._run_group(started))
                        continue
                    self._changed.clear()
                    t0 = time.perf_counter()
                    await self._changed.wait()
                    self.capacity_wait_s += time.perf_counter() - t0
        except ExceptionGroup as eg:
            raise eg.exceptions[0] from eg
        return self.ledger()

    def ledger(self) -> dict[str, Any]:
        """Where every started group ended (call when run() returned: nothing is running then)."""
        c = self.counts
        return {
            "groups_started": c["groups_started"],
            "groups_assigned": sum(self.scheduler.filled[self.start_version :]),
            "groups_filtered": dict(self.scheduler.dropped),
            "groups_kept_by_fallback": c["kept_by_fallback"],
            "surplus_cached": c["partials_cached"],
            "surplus_dropped": c["dropped_surplus"],
            "surplus_finished_dropped": c["dropped_surplus_finished"],
            "partials_resumed": c["partials_resumed"],
            "partials_restored": c["partials_restored"],
            "groups_pending_restored": c["groups_pending_restored"],
            "partials_too_stale": c["dropped_partial_too_stale"],
            "partials_held": len(self._held),
            "partials_taken": c["partials_taken"],
            "samples_sent": c["samples_sent"],
            "partial_samples_sent": c["partial_samples_sent"],
            "inflight_resumes": c["inflight_resumes"],
        }

    async def _admit_next(self) -> Group | None:
        if len(self.scheduler.running) >= self._max_groups or self.scheduler.capacity() <= 0:
            return None
        if not self._pending:
            await self._resumable(self.scheduler.capacity())
        while self._held and not self._pending:
            group = self._held[0]
            base = self._base_version(group)
            deadline = (self.version if base is None else base) + self.cfg.max_staleness
            if deadline < self.version or self.scheduler.free(deadline) == 0:
                self._held.popleft()  # its window has passed or filled: it can never be trained
                self.counts["dropped_partial_too_stale"] += 1
                self.progress.drop()
                continue
            if self.scheduler.capacity(base) <= 0:
                return None
            self._held.popleft()
            group.seq = self.scheduler.admit(base)
            self.counts["partials_resumed"] += 1
            break
        else:
            group = self._new_group()
        self._groups[group.seq] = group
        self.progress.opened(group)
        self.counts["groups_started"] += 1
        return group

    # --- one group ----------------------------------------------------------------------------------

    def _surplus(self, group: Group) -> bool:
        return self.scheduler.groups[group.seq].state == "surplus"

    async def _run_group(self, group: Group) -> None:
        try:
            await self._decode(group.prompt, group.responses, self.train_params, group)
            if self._surplus(group):  # also every case of unfinished responses: only surplus stops decoding
                self.scheduler.finish(group.seq)
                await self._set_aside(group)
                return
            await self._score(group.prompt, group.responses)
            samples = [self._sample(group, i, batch=-1) for i in range(len(group.responses))]
            keep, reason = verdict(self.filter(samples), self.cfg.dynamic_sampling_filter_path or "")
            fallback = self.cfg.dynamic_sampling_filter == "reward_std_fallback"
            if not keep and fallback and self.scheduler.would_starve(group.seq):
                keep = True
                self.counts["kept_by_fallback"] += 1
            batch = self.scheduler.finish(group.seq, keep=keep, reason=reason)
            if batch is None:
                if keep:  # no room left in its window: the batch filled while it ran
                    self.counts["dropped_surplus_finished"] += 1
                self.progress.drop(group)
                return
            self.progress.assigned(group, batch)
            await self.sink.send([self._sample(group, i, batch) for i in range(len(group.responses))])
            self.counts["samples_sent"] += len(group.responses)
        finally:
            self._groups.pop(group.seq, None)
            await self._abort_surplus()
            self._changed.set()

    async def _set_aside(self, group: Group) -> None:
        """A surplus group: into the partial-rollout cache (resumed later) or counted as dropped."""
        if self.partials is None:
            self.counts["dropped_surplus"] += 1
            self.progress.drop(group)
            return
        samples = [self._sample(group, i, batch=-1) for i in range(len(group.responses))]
        self.progress.set_aside(group, samples)
        await self.partials.put(samples)
        self.counts["partial_samples_sent"] += len(group.responses)
        self.counts["partials_cached"] += 1

    async def _decode(
        self, prompt: Prompt, responses: list[Response], params: SamplingParams, group: Group | None = None
    ) -> None:
        """Generate until every response finished (resuming requests a weight update cut short), or
        until the group turns surplus."""
        while True:
            todo = [r for r in responses if r.finish is None]
            if not todo or (group is not None and self._surplus(group)):
                return
            requests = [
                GenerateRequest(
                    rid=next(self._rids),
                    prompt_ids=prompt.token_ids + tuple(r.tokens),
                    params=msgspec.structs.replace(params, max_new_tokens=r.budget - len(r.tokens)),
                    seed=r.seed,
                    sample_offset=len(r.tokens),
                )
                for r in todo
            ]
            engine = min(range(len(self.engines)), key=self._in_flight.__getitem__)
            if group is not None:
                group.rids, group.engine = {q.rid for q in requests}, engine
            self._in_flight[engine] += len(requests)
            try:
                results = await self.engines[engine].generate(requests)
            finally:
                self._in_flight[engine] -= len(requests)
                if group is not None:
                    group.rids = set()
            for r, result in zip(todo, results, strict=True):
                r.tokens += result.token_ids
                r.logprobs += result.logprobs
                r.versions += result.versions
                r.mask += [1] * len(result.token_ids)
                if result.finish_reason != "abort":
                    r.finish = result.finish_reason
                elif group is None or not self._surplus(group):
                    self.counts["inflight_resumes"] += 1  # cut by a weight update: resumed next round

    async def _score(self, prompt: Prompt, responses: list[Response]) -> None:
        for r in responses:
            r.text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        rewards = await self.rewards.score(
            [r.text for r in responses], prompt.label, prompt.metadata, prompt=prompt.text
        )
        for r, reward in zip(responses, rewards, strict=True):
            r.reward = reward

    def _sample(self, group: Group, index: int, batch: int) -> Sample:
        r = group.responses[index]
        return Sample.build(
            prompt_ids=group.prompt.token_ids,
            response_ids=r.tokens,
            rollout_logprobs=r.logprobs,
            versions=r.versions,
            loss_mask=r.mask,
            group_id=group.seq,
            index=index,
            group_size=len(group.responses),
            prompt_index=group.prompt.index,
            reward=r.reward,
            status=STATUS[r.finish],
            label=group.prompt.label,
            metadata=group.prompt.metadata,
            response_text=r.text,
            batch=batch,
            seed=r.seed,
        )

    # --- evaluation ---------------------------------------------------------------------------------

    async def evaluate(self, name: str) -> dict[str, float]:
        """Mean reward, accuracy (share of positive rewards), pass@1..n (eval_metrics), response length
        and truncation on one eval set, n = eval.n_samples_per_eval_prompt responses per prompt."""
        prompts = self.eval_sets[name]
        n = self.eval_cfg.n_samples_per_eval_prompt
        slots = asyncio.Semaphore(max(1, self.cfg.max_concurrency // n))
        budget = self.eval_params.max_new_tokens

        async def one(prompt: Prompt) -> list[Response]:
            # The same seeds at every evaluation: differences between evaluations come from the policy.
            responses = [
                Response(seed=derive_seed(self.cfg.seed, EVAL, prompt.index, i), budget=budget)
                for i in range(n)
            ]
            async with slots:
                await self._decode(prompt, responses, self.eval_params)
                await self._score(prompt, responses)
            return responses

        start = time.perf_counter()
        groups = await gather_all(one(p) for p in prompts)
        responses = [r for group in groups for r in group]
        return {
            **eval_set_metrics(name, [[r.reward for r in group] for group in groups]),
            f"eval/{name}/response_len": float(np.mean([len(r.tokens) for r in responses])),
            f"eval/{name}/truncated_frac": float(np.mean([r.finish == "length" for r in responses])),
            f"eval/{name}/samples": float(len(responses)),
            f"eval/{name}/time": time.perf_counter() - start,
        }

    def stats(self) -> dict[str, float]:
        out = {f"producer/{k}": float(v) for k, v in sorted(self.counts.items())}
        out.update({f"producer/dropped_{k}": float(v) for k, v in sorted(self.scheduler.dropped.items())})
        out["producer/groups_assigned"] = float(sum(self.scheduler.filled))
        out["producer/capacity_wait_s"] = self.capacity_wait_s
        out["producer/running_groups"] = float(len(self.scheduler.running))
        return out
