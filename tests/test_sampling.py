"""Sampling: the log-prob formula, top-k / top-p supports, greedy, and seeded draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.rollout.sampling import derive_seed, filter_logits, position_uniforms, sample_next


def draw(logits, temperature=1.0, top_p=1.0, top_k=-1, seeds=None):
    b = logits.shape[0]
    seeds = np.arange(b, dtype=np.uint64) if seeds is None else seeds
    return sample_next(
        logits,
        torch.full((b,), temperature),
        torch.full((b,), top_p),
        torch.full((b,), top_k, dtype=torch.long),
        position_uniforms(seeds, 0),
    )


def test_logprob_is_full_vocab_log_softmax_at_temperature() -> None:
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(1))
    for t, p, k in ((1.0, 1.0, -1), (0.6, 0.9, -1), (1.3, 1.0, 5)):
        tokens, logprobs = draw(logits, t, p, k)
        want = torch.log_softmax(logits / t, -1).gather(-1, tokens[:, None]).squeeze(-1)
        assert torch.allclose(logprobs, want, atol=1e-6)  # top-k/top-p do not renormalise


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.randn(1, 50).expand(4000, 50).contiguous()
    seeds = np.arange(4000, dtype=np.uint64)
    top5 = set(logits[0].topk(5).indices.tolist())
    tokens, _ = draw(logits, top_k=5, seeds=seeds)
    assert set(tokens.tolist()) == top5
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    nucleus = set(order[: int((cum < 0.5).sum()) + 1].tolist())
    tokens, _ = draw(logits, top_p=0.5, seeds=seeds)
    assert set(tokens.tolist()) == nucleus


def test_draws_follow_the_distribution() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    tokens, _ = draw(logits, seeds=np.arange(20000, dtype=np.uint64) * 7919)
    freq = torch.bincount(tokens, minlength=3).float() / 20000
    assert torch.allclose(freq, torch.softmax(logits[0], -1), atol=0.015)


def test_greedy_and_filter_keeps_best() -> None:
    logits = torch.randn(8, 20)
    tokens, logprobs = draw(logits, temperature=0.0)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1))
    filtered = filter_logits(logits, torch.full((8,), 1e-9), torch.full((8,), -1, dtype=torch.long))
    assert (filtered.isfinite().sum(-1) == 1).all()


def test_seeds_are_stable_and_distinct() -> None:
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert len({derive_seed(7, 1, g, i) for g in range(50) for i in range(8)}) == 400
    u = position_uniforms(np.array([5, 5, 6], dtype=np.uint64), 3)
    assert u[0] == u[1] != u[2] and ((u > 0) & (u < 1)).all()
    with pytest.raises(AssertionError):
        assert (
            position_uniforms(np.array([5], dtype=np.uint64), 0)[0]
            == position_uniforms(np.array([5], dtype=np.uint64), 1)[0]
        )
