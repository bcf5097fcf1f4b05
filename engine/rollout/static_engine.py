"""The static-cache embedded engine: a KV cache allocated once, continuous batching, CUDA-graph decode.

`StaticEngine` keeps HFEngine's contract (loading, `load_weights` with its checks, versions, per-token
log-probs = log_softmax(logits / temperature) of the drawn token, stop tokens, the (seed, position) draws)
and replaces the decode loop: the model's forward runs on engine/rollout/dense_forward.py over a
`SlotCache` of inference.max_batch_size slots x inference.context_length positions, and a `SlotBatch`
lets requests join (prefill into free slots) and leave (finish, abort) between decode steps.

Guarantees, beyond HFEngine's:
- a request's tokens and log-probs do not depend on the requests around it or on when it joined (rows
  are independent; the draw is a function of seed and position), up to floating-point effects of batch
  shape on the logits;
- live requests always occupy slots 0..n-1 (a leaving request's slot is refilled by the last live one),
  so a decode step runs on a prefix of the slots and a free slot is reused at once;
- a request whose prompt plus budget exceeds inference.context_length stops with "length" when its slot
  is full; a prompt that does not fit at all is refused with an error naming that key.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.errors import ConfigError
from engine.rollout.decode_graphs import DecodeInputs, DecodeRunner
from engine.rollout.dense_forward import DenseForward
from engine.rollout.device_sampling import as_int64_seeds, draw, truncates
from engine.rollout.hf_engine import HFEngine
from engine.rollout.kv_cache import ALIGN, SlotCache
from engine.wire import GenerateRequest, GenerateResult


class StaticEngine(HFEngine):
    """One model replica on one device with a static KV cache. Not thread-safe: its owner serialises
    calls. At most one SlotBatch is live at a time (it owns the cache)."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        seed: int = 0,
        device: str = "cpu",
        overrides: dict[str, Any] | None = None,
        max_batch_size: int = 256,
        context_length: int = 4096,
        max_prefill_tokens: int = 16384,
        cuda_graph: bool = True,
    ) -> None:
        super().__init__(model_path, dtype=dtype, seed=seed, device=device, overrides=overrides)
        c = self.config
        self.cache_slots = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        try:
            self.forward = DenseForward(self.model, c, positions=-(-context_length // ALIGN) * ALIGN)
        except ValueError as e:
            raise ConfigError(
                f"the static engine cannot run {model_path}: {e}", section="inference", key="engine_impl"
            ) from None
        self.kv = SlotCache(
            layers=c.num_hidden_layers,
            slots=max_batch_size,
            context_length=context_length,
            kv_heads=self.forward.kv_heads,
            head_dim=self.forward.head_dim,
            dtype=self.forward.embed.dtype,
            device=self.device,
        )
        self.inputs = DecodeInputs(max_batch_size, self.device)
        self.runner = DecodeRunner(
            self.forward, self.kv, self.inputs, use_graphs=cuda_graph and self.device.type == "cuda"
        )
        self._batch: SlotBatch | None = None

    def release_memory(self) -> None:
        """Colocated mode, while the learner trains: the KV cache's memory and the decode graphs (which
        point at it) are released; resume_memory reallocates the cache and graphs are captured again."""
        if self._batch is not None and not self._batch.done:
            raise RuntimeError("release_memory while a batch is decoding")
        self._batch = None
        self.runner.drop_graphs()
        self.kv.release()
        super().release_memory()

    def resume_memory(self) -> None:
        self.kv.restore()

    def start(self, requests: list[GenerateRequest]) -> SlotBatch:  # type: ignore[override]
        """A new SlotBatch with these requests joined (their results come from its next step)."""
        if self._batch is not None and not self._batch.done:
            raise RuntimeError("the static engine runs one batch at a time; the previous one is live")
        self._batch = SlotBatch(self)
        self._batch.ready += self._batch.join(requests)
        return self._batch

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Run requests to completion, joining waiting ones as slots free up."""
        batch = self.start([])
        waiting = list(reversed(requests))
        results: list[GenerateResult] = []
        while waiting or not batch.done:
            if waiting and batch.free_slots:
                take = [waiting.pop() for _ in range(min(batch.free_slots, len(waiting)))]
                results += batch.join(take)
            results += batch.step()
        order = {r.rid: i for i, r in enumerate(requests)}
        return sorted(results, key=lambda r: order[r.rid])


class SlotBatch:
    """The live requests of a StaticEngine, one per slot 0..n-1; requests join and leave between steps.

    Same interface as DecodeBatch where the actor uses it (step, abort, done, requests, steps), plus
    `join` and `free_slots`."""

    def __init__(self, engine: StaticEngine) -> None:
        self.engine = engine
        slots, length = engine.cache_slots, engine.kv.context_length
        self.live: list[GenerateRequest] = []
        self.ready: list[GenerateResult] = []  # finished but not yet reported
        self.steps = 0
        self.tokens = np.zeros((slots, length), dtype=np.int64)
        self.logprobs = np.zeros((slots, length), dtype=np.float64)
        self.versions = np.zeros((slots, length), dtype=np.int64)
        self.drawn = np.zeros(slots, dtype=np.int64)  # response tokens so far
        self.context = np.zeros(slots, dtype=np.int64)  # prompt + response tokens so far
        self.budget = np.zeros(slots, dtype=np.int64)
        self.truncating = np.zeros(slots, dtype=bool)
        self.stops = np.full((slots, 1), -1, dtype=np.int64)

    @property
    def requests(self) -> list[GenerateRequest]:
        return list(self.live)

    @property
    def free_slots(self) -> int:
        return self.engine.cache_slots - len(self.live)

    @property
    def done(self) -> bool:
        return not self.live and not self.ready

    def _take_ready(self) -> list[GenerateResult]:
        out, self.ready = self.ready, []
        return out

    @torch.no_grad()
    def join(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Prefill requests into free slots and draw their first tokens; returns those already finished
        (a budget of 0 or 1, a stop token first)."""
        engine = self.engine
        if len(requests) > self.free_slots:
            raise ValueError(f"{len(requests)} requests for {self.free_slots} free slots")
        limit = engine.kv.context_length
        for r in requests:
            if not r.prompt_ids:
                raise ValueError(f"request {r.rid}: the prompt is empty")
            if len(r.prompt_ids) >= limit:
                raise ConfigError(
                    f"request {r.rid}: a prompt of {len(r.prompt_ids)} tokens does not fit "
                    f"inference.context_length = {limit} (it needs at least one more position)",
                    section="inference",
                    key="context_length",
                )
        out = [
            GenerateResult(rid=r.rid, token_ids=[], logprobs=[], versions=[], finish_reason="length")
            for r in requests
            if r.params.max_new_tokens <= 0
        ]
        joining = [r for r in requests if r.params.max_new_tokens > 0]
        if not joining:
            return out
        first = len(self.live)
        rows = list(range(first, first + len(joining)))
        self.live += joining
        vocab = engine.forward.vocab
        seeds = np.array(
            [r.seed if r.seed is not None else int(engine._seeds.integers(1 << 62)) for r in joining],
            dtype=np.uint64,
        )
        offsets = [r.sample_offset for r in joining]
        engine.inputs.set_rows(
            rows,
            seeds=torch.from_numpy(as_int64_seeds(seeds)),
            draw_index=offsets,
            temperature=[r.params.temperature for r in joining],
            top_p=[r.params.top_p for r in joining],
            top_k=[r.params.top_k for r in joining],
        )
        lengths = np.array([len(r.prompt_ids) for r in joining], dtype=np.int64)
        self.drawn[rows] = 0
        self.context[rows] = lengths
        self.budget[rows] = np.minimum([r.params.max_new_tokens for r in joining], limit - lengths)
        self.truncating[rows] = [truncates(r.params.top_p, r.params.top_k, vocab) for r in joining]
        stop_sets = [sorted(engine.eos_ids | set(r.params.stop_token_ids)) for r in joining]
        width = max(len(s) for s in stop_sets)
        if width > self.stops.shape[1]:
            self.stops = np.pad(self.stops, ((0, 0), (0, width - self.stops.shape[1])), constant_values=-1)
        self.stops[rows] = -1
        for row, s in zip(rows, stop_sets, strict=True):
            self.stops[row, : len(s)] = s
        drawn = self._prefill(joining, rows, lengths)
        return out + self._record(np.array(rows), drawn)

    def _prefill(self, joining: list[GenerateRequest], rows: list[int], lengths: np.ndarray) -> torch.Tensor:
        """Prefill in chunks of at most max_prefill_tokens padded tokens (prompts sorted by length);
        returns the first draws [2, n] (tokens, log-probs) in `joining` order, on the host."""
        engine, device = self.engine, self.engine.device
        order = np.argsort(lengths, kind="stable")
        packed = torch.zeros(2, len(joining), dtype=torch.float64)
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * lengths[order[end]] <= engine.max_prefill_tokens:
                end += 1
            chunk = order[start:end]
            width = int(lengths[chunk].max())
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, j in enumerate(chunk):
                ids[i, : lengths[j]] = torch.tensor(joining[j].prompt_ids, dtype=torch.long)
            slot = torch.tensor([rows[j] for j in chunk], dtype=torch.long, device=device)
            lens = torch.from_numpy(lengths[chunk]).to(device)
            logits = engine.forward.prefill(engine.kv, ids.to(device), lens, slot)
            x = engine.inputs
            tokens, logprobs = draw(
                logits,
                x.temperature[slot],
                x.top_p[slot],
                x.top_k[slot],
                x.seeds[slot],
                x.draw_index[slot],
                bool(self.truncating[[rows[j] for j in chunk]].any()),
            )
            x.tokens[slot] = tokens
            x.positions[slot] = lens
            x.draw_index[slot] += 1
            packed[:, torch.from_numpy(chunk)] = torch.stack([tokens.double(), logprobs.double()]).cpu()
            start = end
        return packed

    def _record(self, rows: np.ndarray, drawn: torch.Tensor) -> list[GenerateResult]:
        """Append the drawn tokens [2, len(rows)] to these rows; finish and release the rows that stop."""
        values = drawn.numpy()
        tokens = values[0].astype(np.int64)
        at = self.drawn[rows]
        self.tokens[rows, at] = tokens
        self.logprobs[rows, at] = values[1]
        self.versions[rows, at] = self.engine.version
        self.drawn[rows] += 1
        self.context[rows] += 1
        stopped = (self.stops[rows] == tokens[:, None]).any(axis=1)
        full = self.drawn[rows] >= self.budget[rows]
        finished = {int(r): "stop" if s else "length" for r, s, f in zip(rows, stopped, full) if s or f}
        return self._release(finished)

    def step(self) -> list[GenerateResult]:
        """Draw one token for every live request; returns the requests that finished (and any results
        not yet reported)."""
        if not self.live:
            return self._take_ready()
        n = len(self.live)
        span = int(self.context[:n].max())
        drawn = self.engine.runner.step(n, span, bool(self.truncating[:n].any()))
        self.steps += 1
        return self._take_ready() + self._record(np.arange(n), drawn)

    def abort(self, rids: set[int] | None = None) -> list[GenerateResult]:
        """Stop live requests now (all when rids is None); returns their partial results."""
        cut = {i: "abort" for i, r in enumerate(self.live) if rids is None or r.rid in rids}
        return self._take_ready() + self._release(cut)

    def _release(self, finished: dict[int, str]) -> list[GenerateResult]:
        """Results of the finished rows; the last live rows move into their slots."""
        if not finished:
            return []
        results = []
        for row, reason in finished.items():
            n = int(self.drawn[row])
            results.append(
                GenerateResult(
                    rid=self.live[row].rid,
                    token_ids=self.tokens[row, :n].tolist(),
                    logprobs=self.logprobs[row, :n].tolist(),
                    versions=self.versions[row, :n].tolist(),
                    finish_reason=reason,  # type: ignore[arg-type]
                )
            )
        remaining = len(self.live) - len(finished)
        holes = sorted(r for r in finished if r < remaining)
        movers = [r for r in range(remaining, len(self.live)) if r not in finished]
        if movers:
            span = int(self.context[movers].max())
            for array in (self.tokens, self.logprobs, self.versions, self.stops):
                array[holes] = array[movers]
            for array in (self.drawn, self.context, self.budget, self.truncating):  # type: ignore[assignment]
                array[holes] = array[movers]
            for hole, mover in zip(holes, movers, strict=True):
                self.live[hole] = self.live[mover]
            self.engine.kv.move(movers, holes, span)
            self.engine.inputs.move(movers, holes)
        del self.live[remaining:]
        return results
