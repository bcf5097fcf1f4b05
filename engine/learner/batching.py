"""From samples to padded micro-batch tensors, and the split of a rollout over steps and ranks.

Layout: a micro-batch holds b sequences (prompt + response) right-padded to a common length s; every
per-token tensor is in "shifted" coordinates of length s - 1, where position j holds what predicts token
j + 1, so response token k of a sample with prompt length P sits at j = P - 1 + k. Padding never counts:
its mask is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.wire import Sample


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

    def causal_mask(self) -> torch.Tensor:
        """Megatron's attention mask: True where attention is not allowed, [1, 1, s, s]."""
        s = self.tokens.shape[1]
        return torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]


def make_micro_batch(samples: list[Sample], indices: list[int]) -> MicroBatch:
    """The padded tensors of samples (indices: their positions in the rollout); no advantages yet."""
    lengths = [len(x.prompt_array) + x.response_len for x in samples]
    b, s = len(samples), max(lengths)
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
    return MicroBatch(tokens, positions, tokens[:, 1:], mask, span, rollout, index)


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
