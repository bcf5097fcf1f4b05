"""From samples to padded micro-batch tensors, and the split of a rollout over steps and ranks.

Layout: a micro-batch holds b sequences (prompt + response) right-padded to a common length s; every
per-token tensor is in "shifted" coordinates of length s - 1, where position j holds what predicts token
j + 1, so response token k of a sample with prompt length P sits at j = P - 1 + k. Padding never counts:
its mask is 0.

Packed micro-batches (dynamic batching): the model sees the samples laid end to end in one row with no
padding (`Packing`, attention and positions restart at each sample), and what it returns per position is
moved back into the padded shifted layout above right after the forward (`MicroBatch.unpack`). Everything
downstream (loss, per-sample aggregation, advantages, the critic's values) therefore sees exactly the
tensors of a padded micro-batch: the position that would predict the next sample's first token is never
read, and padded positions hold zeros. The grouping of a step's samples into micro-batches
(`chunk_by_tokens`) changes, the samples of each step do not.

Context parallelism (`MicroBatch.cp`, engine/learner/context_parallel.py): the model row (the padded rows,
their length rounded up to a multiple of 2 * cp; or the packed row, each sample padded to such a
multiple) is split along the sequence, each CP rank runs the model on its positions, and `unpack`
all-gathers what the ranks computed per position, so the layout above, and everything downstream, is
the same on every CP rank and the same as without CP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import ConfigError
from engine.learner.context_parallel import ContextGroup, ContextSlice, round_up
from engine.wire import Sample


@dataclass
class Packing:
    """The samples of a micro-batch end to end in one row: sample i at packed positions cu[i]:cu[i+1].

    Packed position p < T - 1 predicts packed token p + 1; (rows, cols) <- src maps every packed position
    that predicts a token of its own sample to the padded shifted layout.
    """

    tokens: torch.Tensor  # [1, T] long
    positions: torch.Tensor  # [1, T] long: 0..len_i - 1 for each sample
    lengths: list[int]
    rows: torch.Tensor  # [n] long
    cols: torch.Tensor  # [n] long
    src: torch.Tensor  # [n] long: packed shifted position of (rows, cols)

    @classmethod
    def of(cls, tokens: torch.Tensor, lengths: list[int], cp: int = 1) -> Packing:
        """From padded tokens [b, s] and each row's length; with cp > 1 each sample is followed by padding
        up to a multiple of 2 * cp (`lengths` then holds the padded lengths)."""
        rows, cols, src, starts = [], [], [], 0
        padded = [round_up(n, cp) if cp > 1 else n for n in lengths]
        for i, (n, m) in enumerate(zip(lengths, padded, strict=True)):
            rows.append(torch.full((n - 1,), i, dtype=torch.long))
            cols.append(torch.arange(n - 1))
            src.append(torch.arange(starts, starts + n - 1))
            starts += m
        packed = torch.cat(
            [
                torch.cat([tokens[i, :n], tokens.new_zeros(m - n)])
                for i, (n, m) in enumerate(zip(lengths, padded))
            ]
        )[None]
        positions = torch.cat([torch.arange(m) for m in padded])[None]
        return cls(packed, positions, padded, torch.cat(rows), torch.cat(cols), torch.cat(src))


@dataclass
class MicroBatch:
    tokens: torch.Tensor  # [b, s] long
    positions: torch.Tensor  # [b, s] long
    targets: torch.Tensor  # [b, s-1] long
    mask: torch.Tensor  # [b, s-1] float: tokens that count in the loss
    span: torch.Tensor  # [b, s-1] float: every response position (the mask may leave some out)
    rollout_logp: torch.Tensor  # [b, s-1] float
    index: torch.Tensor  # [b] long: each row's index in the rollout
    advantages: torch.Tensor | None = None  # [b, s-1] float
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    old_values: torch.Tensor | None = None  # the critic's, before this rollout's steps (ppo)
    returns: torch.Tensor | None = None  # the critic's targets (ppo)

    packing: Packing | None = None  # set: the model runs on the packed row (dynamic batching)
    cp: ContextSlice | None = None  # set: this CP rank runs the model on its part of the model row

    def causal_mask(self) -> torch.Tensor:
        """Megatron's attention mask: True where attention is not allowed, [1, 1, s, s]."""
        s = self.tokens.shape[1]
        ones = torch.ones(s, s, dtype=torch.bool, device=self.tokens.device)
        return torch.triu(ones, diagonal=1)[None, None]

    def to(self, device: torch.device) -> MicroBatch:
        """This micro-batch with every tensor on device (itself when they are there already): micro-batches
        are made and kept on the CPU, and each forward pass works on a copy on the model's device."""
        if self.tokens.device == device:
            return self

        def move(t: Any) -> Any:
            return t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t

        packing = self.packing
        if packing is not None:
            packing = dataclasses.replace(
                packing, **{f.name: move(getattr(packing, f.name)) for f in dataclasses.fields(packing)}
            )
        names = [f.name for f in dataclasses.fields(self) if f.name not in ("packing", "cp")]
        fields = {name: move(getattr(self, name)) for name in names}
        return MicroBatch(**fields, packing=packing, cp=self.cp)

    def model_inputs(self) -> dict[str, Any]:
        """GPTModel's keyword arguments: the padded rows with a causal mask, or the packed row (thd); with
        CP, this rank's positions of them (the attention computes the causal mask in global positions)."""
        if self.cp is not None:
            return self._cp_inputs(self.cp.index.to(self.tokens.device))
        if self.packing is None:
            return {
                "input_ids": self.tokens,
                "position_ids": self.positions,
                "attention_mask": self.causal_mask(),
            }
        from engine.learner.attention import packed_seq_params

        p = self.packing
        return {
            "input_ids": p.tokens,
            "position_ids": p.positions,
            "attention_mask": None,
            "packed_seq_params": packed_seq_params(p.lengths, p.tokens.device),
        }

    def _cp_inputs(self, index: torch.Tensor) -> dict[str, Any]:
        if self.packing is None:
            tokens, positions = self.tokens[:, index], self.positions[:, index]
            return {"input_ids": tokens, "position_ids": positions, "attention_mask": None}
        from engine.learner.attention import packed_seq_params

        p = self.packing
        return {
            "input_ids": p.tokens[:, index],
            "position_ids": p.positions[:, index],
            "attention_mask": None,
            "packed_seq_params": packed_seq_params(p.lengths, p.tokens.device),
        }

    def predicting(self, output: torch.Tensor) -> torch.Tensor:
        """The model output positions that `model_targets` gives a token for (the last position of the
        model row predicts nothing; with CP each rank keeps all of its positions until `unpack`)."""
        return output if self.cp is not None else output[:, :-1]

    def model_targets(self) -> torch.Tensor:
        """The token each position of `predicting(output)` predicts: [b, s-1], or [1, T-1] when packed;
        with CP this rank's positions of the model row (the last position's target is a placeholder)."""
        row = self.tokens if self.packing is None else self.packing.tokens
        if self.cp is None:
            return row[:, 1:]
        following = torch.cat([row[:, 1:], row[:, -1:]], dim=1)
        return following[:, self.cp.index.to(row.device)]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """A per-position model output ([b, s-1] or packed [1, T-1]; with CP this rank's positions) in
        the padded shifted layout [b, s-1] (zeros where no position of the sample predicts a token);
        differentiable (with CP: every rank computes the same thing from it, see
        context_parallel.gather_replicated)."""
        if self.cp is not None:
            x = self.cp.gather(x, dim=1)[:, :-1]
        if self.packing is None:
            return x
        p = self.packing
        return x.new_zeros(self.targets.shape).index_put((p.rows, p.cols), x[0, p.src])


def make_micro_batch(
    samples: list[Sample],
    indices: list[int],
    *,
    packed: bool = False,
    pad_to: int | None = None,
    cp: ContextGroup | None = None,
) -> MicroBatch:
    """The padded tensors of samples (indices: their positions in the rollout); no advantages yet.

    packed: the model runs on the samples packed into one row (see `Packing`). pad_to: pad the rows to at
    least this length (ranks whose forwards exchange tokens need equal shapes). cp: this rank's CP group
    when its size is above 1 (the model row is split over it)."""
    lengths = [len(x.prompt_array) + x.response_len for x in samples]
    b, s = len(samples), max(*lengths, pad_to or 0)
    split = cp is not None and cp.size > 1
    if split and not packed:
        s = round_up(s, cp.size)
    tokens = torch.zeros(b, s, dtype=torch.long)
    mask = torch.zeros(b, s - 1)
    span = torch.zeros(b, s - 1)
    rollout = torch.zeros(b, s - 1)
    for i, x in enumerate(samples):
        prompt, response = (
            torch.from_numpy(x.prompt_array.astype("int64")),
            torch.from_numpy(x.response_array.astype("int64")),
        )
        p, r = len(prompt), len(response)
        tokens[i, :p] = prompt
        tokens[i, p : p + r] = response
        cut = slice(p - 1, p - 1 + r)
        mask[i, cut] = torch.from_numpy(x.mask_array.astype("float32"))
        span[i, cut] = 1.0
        rollout[i, cut] = torch.from_numpy(x.logprob_array.copy())
    positions = torch.arange(s).expand(b, s).contiguous()
    index = torch.tensor(indices, dtype=torch.long)
    packing = Packing.of(tokens, lengths, cp.size if split else 1) if packed else None
    context = None
    if split:
        context = cp.slice(packing.lengths if packing is not None else [s])
    return MicroBatch(
        tokens, positions, tokens[:, 1:], mask, span, rollout, index, packing=packing, cp=context
    )


def split_rollout(num_samples: int, num_steps: int, dp_rank: int, dp_size: int) -> list[list[int]]:
    """For each optimizer step, the sample indices this data-parallel rank trains on.

    The rollout's samples are cut into num_steps consecutive global batches; rank r takes every
    dp_size-th sample of each, starting at r.
    """
    per_step = num_samples // num_steps
    return [
        list(range(step * per_step + dp_rank, (step + 1) * per_step, dp_size)) for step in range(num_steps)
    ]


def chunk(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def chunk_by_tokens(indices: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """indices cut into groups of at most max_tokens tokens (lengths[k]: sample indices[k]'s length), by
    first-fit decreasing; each group keeps rollout order. A sample longer than max_tokens is an error."""
    bins: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(indices)), key=lambda k: -lengths[k]):
        n = lengths[k]
        if n > max_tokens:
            raise ConfigError(
                f"sample {indices[k]} has {n} tokens (prompt + response), more than max_tokens_per_gpu = "
                f"{max_tokens}; raise it to at least the longest prompt + response",
                section="perf",
                key="max_tokens_per_gpu",
            )
        slot = next((b for b, r in enumerate(room) if r >= n), None)
        if slot is None:
            bins.append([])
            room.append(max_tokens)
            slot = len(bins) - 1
        bins[slot].append(indices[k])
        room[slot] -= n
    return [sorted(b) for b in bins]
