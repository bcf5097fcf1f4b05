"""Advantage estimators, as pure functions over per-sample rewards and per-token tensors.

Per-token tensors are [b, t] in the micro-batch's shifted coordinates (engine/learner/batching.py):
`span` is 1.0 on a sample's response positions (contiguous, whatever the loss mask says) and 0.0 on
prompt and padding, so recursions over a response never leak into another sample or into padding.
Guarantee: every function here is the formula in docs/algorithms.md, and nothing here has a gradient.

    grpo / gspo / cispo          A_i = (r_i - mean_g r) / (std_g r + eps), on every token of response i
    reinforce_plus_plus          A_t = sum_{s >= t} gamma^(s-t) (-beta kl_s + [s = last] r_i), whitened
    reinforce_plus_plus_baseline as above with r_i - mean_g r in place of r_i
    ppo                          GAE(gamma, lambda) over the critic's values, whitened
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.learner.batching import MicroBatch
from engine.learner.config import AlgoConfig
from engine.learner.loss import kl_estimate

GROUP_ESTIMATORS = ("grpo", "gspo", "cispo")
TOKEN_ESTIMATORS = ("reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo")


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    center: bool = True,
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Per-sample advantage from its group: r - mean (center), / (std + eps) (std_normalize, unbiased std).

    With center off the reward is used as it is (std_normalize then divides it by the group's std).
    """
    adv = rewards.to(torch.float32).clone()
    for gid in group_ids.unique():
        idx = group_ids == gid
        r = rewards[idx].to(torch.float32)
        value = r - r.mean() if center else r
        if std_normalize:
            std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype)
            value = value / (std + eps)
        adv[idx] = value
    return adv


def last_positions(span: torch.Tensor) -> torch.Tensor:
    """Index of each row's last response position ([b] long); rows without any give -1."""
    t = span.shape[-1]
    idx = torch.arange(t).expand_as(span)
    return torch.where(span > 0, idx, torch.full_like(idx, -1)).max(-1).values


def token_rewards(
    scalar: torch.Tensor, kl: torch.Tensor | None, kl_coef: float, span: torch.Tensor
) -> torch.Tensor:
    """r_t = -kl_coef kl_t on response positions, plus the sample's scalar reward on its last token."""
    out = torch.zeros_like(span, dtype=torch.float32)
    if kl is not None and kl_coef:
        out = out - kl_coef * kl.float() * span
    last = last_positions(span)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    out[rows, last[rows]] += scalar[rows].float()
    return out


def discounted_returns(rewards: torch.Tensor, span: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1} within each response (0 outside it)."""
    out = torch.zeros_like(rewards, dtype=torch.float32)
    running = torch.zeros(rewards.shape[0], dtype=torch.float32)
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = (rewards[:, t] + gamma * running) * span[:, t]
        out[:, t] = running
    return out


def gae(
    rewards: torch.Tensor, values: torch.Tensor, span: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation and returns (advantages + values) within each response.

    delta_t = r_t + gamma V_{t+1} - V_t (V after the last response token is 0);
    A_t = delta_t + gamma lam A_{t+1}.
    """
    values = values.float() * span
    adv = torch.zeros_like(values)
    running = torch.zeros(values.shape[0], dtype=torch.float32)
    next_value = torch.zeros(values.shape[0], dtype=torch.float32)
    for t in range(values.shape[-1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * span[:, t]
        adv[:, t] = running
        next_value = values[:, t] * span[:, t]
    return adv, adv + values


def whiten_stats(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[count, sum, sum of squares] of x over mask, float64: summed across micro-batches and ranks."""
    m = mask.double()
    xd = x.double() * m
    return torch.stack([m.sum(), xd.sum(), (xd * x.double()).sum()])


def whiten(x: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) on masked positions, with mean and (biased) std from whiten_stats."""
    count, total, squares = (float(v) for v in stats)
    count = max(count, 1.0)
    mean = total / count
    std = max(squares / count - mean * mean, 0.0) ** 0.5
    return (x - mean) / (std + eps) * mask


def assign_advantages(
    algo: AlgoConfig,
    micro_batches: list[MicroBatch],
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Set every micro-batch's advantages (and returns, for ppo) for one rollout.

    rewards and group_ids cover the whole rollout; micro_batches are this rank's, with old_logp and
    ref_logp set when algo.kl_coef > 0 and old_values set for ppo. `reduce` sums a tensor over the
    data-parallel ranks, so group statistics of KL-shaped rewards and whitening see the whole rollout.
    """
    kls: list[torch.Tensor | None] = []
    for mb in micro_batches:
        if algo.kl_coef:
            assert mb.old_logp is not None and mb.ref_logp is not None
            kls.append(kl_estimate(mb.old_logp, mb.ref_logp, algo.kl_loss_type).float() * mb.mask)
        else:
            kls.append(None)
    scalar = rewards.to(torch.float32)
    if not algo.token_level:
        if algo.kl_coef:  # sequence-level shaping: r_i - beta sum_t kl_t, before group normalisation
            seq_kl = torch.zeros(len(rewards), dtype=torch.float64)
            for mb, kl in zip(micro_batches, kls, strict=True):
                assert kl is not None
                seq_kl.index_add_(0, mb.index, kl.sum(-1).double())
            scalar = scalar - algo.kl_coef * reduce(seq_kl).float()
        adv = group_advantages(
            scalar, group_ids, center=algo.rewards_normalization, std_normalize=algo.grpo_std_normalization
        )
        for mb in micro_batches:
            mb.advantages = adv[mb.index][:, None] * mb.span
    else:
        if algo.advantage_estimator == "reinforce_plus_plus_baseline":
            scalar = group_advantages(scalar, group_ids, center=True, std_normalize=False)
        for mb, kl in zip(micro_batches, kls, strict=True):
            per_token = token_rewards(scalar[mb.index], kl, algo.kl_coef, mb.span)
            if algo.advantage_estimator == "ppo":
                assert mb.old_values is not None
                mb.advantages, mb.returns = gae(per_token, mb.old_values, mb.span, algo.gamma, algo.lambd)
            else:
                mb.advantages = discounted_returns(per_token, mb.span, algo.gamma)
    if algo.whiten:
        stats = torch.zeros(3, dtype=torch.float64)
        for mb in micro_batches:
            assert mb.advantages is not None
            stats += whiten_stats(mb.advantages, mb.mask)
        stats = reduce(stats)
        for mb in micro_batches:
            assert mb.advantages is not None
            mb.advantages = whiten(mb.advantages, mb.mask, stats)
