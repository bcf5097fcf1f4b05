"""Next-token sampling with per-row temperature, top-k and top-p, and the log-prob the learner recomputes.

The log-prob of a sampled token is log_softmax(logits / temperature) over the full vocabulary, the
same formula the learner uses. Top-k and top-p only change which token is drawn: the reported log-prob
is not renormalised over the kept tokens, so truncated sampling biases the importance ratio (see
docs/algorithms.md). Temperature 0 means greedy, with the log-prob taken at temperature 1.

Draws are by inverse CDF from one uniform number per row, and that number is a hash of the request's
seed and the token position. A request's tokens therefore depend on its seed and the model only, not
on which other requests share its batch: runs with the same seeds repeat (up to floating-point effects
of batch shape on the logits).
"""

from __future__ import annotations

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective 64-bit hash (uint64 arithmetic wraps)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (for example run seed, group id, sample index)."""
    h = np.uint64(0)
    with np.errstate(over="ignore"):
        for p in parts:
            h = mix64(h + _GOLDEN + np.uint64(p & 0xFFFFFFFFFFFFFFFF))
    return int(h) >> 1


def position_uniforms(seeds: np.ndarray, positions: int | np.ndarray) -> torch.Tensor:
    """One uniform in (0, 1) per row from (seed, token position)."""
    pos = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = mix64(np.asarray(seeds, dtype=np.uint64) + _GOLDEN * (pos + np.uint64(1)))
    return torch.from_numpy(((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53))


def sample_next(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    truncate: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits [B, V]; temperature/top_p [B] float; top_k [B] long (-1 off);
    uniforms [B] in (0, 1). Returns (tokens [B] long, logprobs [B] float32).

    truncate: None looks at top_k/top_p to decide whether any row truncates (a device-to-host read);
    True/False says so up front, which keeps the whole draw on the device (CUDA-graph safe)."""
    logits = logits.float()
    greedy = temperature <= 0
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
    logprobs = torch.log_softmax(logits / scale[:, None], dim=-1)
    if truncate is None:
        kept = filter_logits(logprobs, top_p, top_k)
    else:
        kept = truncate_scores(logprobs, top_p, top_k) if truncate else logprobs
    probs = torch.softmax(kept, dim=-1).double()
    cdf = probs.cumsum(dim=-1)
    target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(-1)
    drawn = torch.searchsorted(cdf, target).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    tokens = torch.where(greedy, logits.argmax(dim=-1), drawn)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def filter_logits(scores: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Set scores outside each row's top-k / nucleus (top-p) to -inf; the best token always survives."""
    vocab = scores.shape[-1]
    if not bool(((top_k > 0) & (top_k < vocab)).any() or (top_p < 1.0).any()):
        return scores
    return truncate_scores(scores, top_p, top_k)


def truncate_scores(scores: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """filter_logits without looking at the values first: rows that neither truncate keep every score."""
    vocab = scores.shape[-1]
    use_k = (top_k > 0) & (top_k < vocab)
    use_p = top_p < 1.0
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=scores.device).expand_as(sorted_scores)
    drop = use_k[:, None] & (ranks >= top_k.clamp(min=1)[:, None])
    probs = torch.softmax(sorted_scores, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= use_p[:, None] & (mass_before >= top_p[:, None])
    drop[:, 0] = False
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    return torch.empty_like(scores).scatter_(-1, order, sorted_scores)
