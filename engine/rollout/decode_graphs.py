"""Decode steps over the live slots: eager, or replayed from CUDA graphs captured per bucket.

A step reads the per-slot inputs (`DecodeInputs`: last token, its position, seed, sampling parameters),
runs the forward for rows 0..B-1, draws each row's next token on the device and returns tokens and
log-probs; the inputs then advance on the device (next token in, position + 1), so the host only reads
back the drawn tokens and log-probs, once per step.

Guarantees: a replayed step computes what the eager step computes (the graph is captured from the same
function, on the same buffers); rows past the live count (bucket padding) only touch their own free
slots, whose contents are rewritten before a request ever reads them. Graphs are keyed by (rows bucket,
key-span bucket, truncation) and captured on first use: the warm-up run that precedes a capture is the
very step being asked for (it writes the same keys and values the replay then writes again), so a
capture may happen while requests are live.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.rollout.dense_forward import DenseForward
from engine.rollout.device_sampling import draw
from engine.rollout.kv_cache import ALIGN, SlotCache


class DecodeInputs:
    """Per-slot device buffers a decode step reads (set by the engine when a request joins)."""

    def __init__(self, slots: int, device: torch.device) -> None:
        def zeros(dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(slots, dtype=dtype, device=device)

        self.tokens, self.positions = zeros(torch.long), zeros(torch.long)
        self.seeds, self.draw_index = zeros(torch.long), zeros(torch.long)
        self.temperature, self.top_p = zeros(torch.float32), zeros(torch.float32)
        self.top_k = zeros(torch.long)
        self.rows = torch.arange(slots, device=device)

    def buffers(self) -> list[torch.Tensor]:
        return [
            self.tokens,
            self.positions,
            self.seeds,
            self.draw_index,
            self.temperature,
            self.top_p,
            self.top_k,
        ]

    @torch.no_grad()
    def set_rows(self, rows: list[int], **values: list[Any]) -> None:
        """Write values (keyword: buffer name) into these slots, one host-to-device copy per buffer."""
        device = self.tokens.device
        index = torch.tensor(rows, dtype=torch.long, device=device)
        for name, vals in values.items():
            buf = getattr(self, name)
            src = vals if isinstance(vals, torch.Tensor) else torch.tensor(vals, dtype=buf.dtype)
            buf.index_copy_(0, index, src.to(device=device, dtype=buf.dtype))

    @torch.no_grad()
    def move(self, src: list[int], dst: list[int]) -> None:
        if not src:
            return
        s = torch.tensor(src, dtype=torch.long, device=self.tokens.device)
        d = torch.tensor(dst, dtype=torch.long, device=self.tokens.device)
        for buf in self.buffers():
            buf[d] = buf[s]


def bucket(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


class DecodeRunner:
    """Runs decode steps for rows 0..n-1 of the slots (eager, or CUDA graphs when use_graphs)."""

    def __init__(
        self, forward: DenseForward, cache: SlotCache, inputs: DecodeInputs, *, use_graphs: bool
    ) -> None:
        self.forward, self.cache, self.inputs = forward, cache, inputs
        self.use_graphs = use_graphs
        # Eager steps padded to the buckets as graphs are (a CPU check of the padding; graphs imply it).
        self.pad = False
        self.max_position = cache.context_length - 1
        self.row_buckets = sorted({min(1 << i, cache.slots) for i in range(cache.slots.bit_length() + 1)})
        spans, span = [], ALIGN
        while span < cache.capacity:
            spans.append(span)
            span *= 2
        self.span_buckets = [*spans, cache.capacity]
        self._graphs: dict[tuple[int, int, bool], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._pool: Any = None

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    def drop_graphs(self) -> None:
        """Forget the captured graphs (they point at memory about to be released); the next steps
        capture them again."""
        self._graphs.clear()
        self._pool = None

    def _step(self, rows: int, span: int, truncate: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [rows] long, packed [2, rows] float64: tokens and log-probs) for slots 0..rows-1."""
        x = self.inputs
        logits = self.forward.decode(self.cache, x.tokens[:rows], x.positions[:rows], x.rows[:rows], span)
        tokens, logprobs = draw(
            logits,
            x.temperature[:rows],
            x.top_p[:rows],
            x.top_k[:rows],
            x.seeds[:rows],
            x.draw_index[:rows],
            truncate,
        )
        return tokens, torch.stack([tokens.double(), logprobs.double()])

    def _capture(self, key: tuple[int, int, bool]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(*key)  # the step itself: writes the keys/values the replay writes again
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            tokens, packed = self._step(*key)
        return graph, tokens, packed

    @torch.no_grad()
    def step(self, live: int, span: int, truncate: bool) -> torch.Tensor:
        """Draw the next token of rows 0..live-1, whose keys span positions < span; returns the host
        tensor [2, live] (tokens, log-probs as float64) and advances the inputs on the device."""
        if self.use_graphs or self.pad:
            rows = bucket(live, self.row_buckets)
            key = (rows, bucket(span, self.span_buckets), truncate)
            if not self.use_graphs:
                tokens, packed = self._step(*key)
            else:
                if key not in self._graphs:
                    self._graphs[key] = self._capture(key)
                graph, tokens, packed = self._graphs[key]
                graph.replay()
        else:
            rows = live
            tokens, packed = self._step(rows, span, truncate)
        x = self.inputs
        x.tokens[:rows].copy_(tokens)
        x.positions[:rows].add_(1).clamp_(max=self.max_position)
        x.draw_index[:rows].add_(1)
        return packed[:, :live].cpu()
