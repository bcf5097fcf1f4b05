"""The RL objective, written as small pure functions over per-token tensors.

Notation: logp = log pi_theta(token) at the current weights; old = the learner's recompute before the
optimizer steps of this rollout (or the engine's log-probs with use_rollout_logprobs); rollout = the
engine's log-probs at sampling time; ref = the reference model's. All are log_softmax(logits / T)
of the sampled token over the full vocabulary. Masks are 1.0 on tokens that count and 0.0 elsewhere.
"""

from __future__ import annotations

import torch

from engine.learner.config import AlgoConfig


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, *, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log_softmax(logits / T)[target] at every position, and optionally the entropy of softmax(logits / T).

    logits [..., V], targets [...]; one log_softmax serves both.
    """
    logp_all = torch.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


def grpo_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, std_normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Per-sample advantage: reward minus its group's mean, divided by the group's std (unbiased) + eps."""
    adv = torch.empty_like(rewards, dtype=torch.float32)
    for gid in group_ids.unique():
        idx = group_ids == gid
        r = rewards[idx].float()
        centred = r - r.mean()
        if std_normalize:
            std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype)
            centred = centred / (std + eps)
        adv[idx] = centred
    return adv


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman's k1, k2, k3)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind in ("k3", "low_var_kl"):
        kl = torch.exp(-log_ratio) - 1 + log_ratio
        return kl.clamp(-10.0, 10.0) if kind == "low_var_kl" else kl
    raise ValueError(f"unknown KL estimator {kind!r}")


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate (to minimise) and a clip indicator.

    ratio = exp(logp - old); loss = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps_high)); with dual clip
    (eps_clip_c = c > 1), tokens with A < 0 are capped at -A c.
    """
    ratio = torch.exp(logp - old_logp)
    high = eps_clip if eps_clip_high is None else eps_clip_high
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + high)
    loss = torch.maximum(loss1, loss2)
    clipped = (loss2 > loss1).float()
    if eps_clip_c is not None:
        capped = torch.minimum(loss, -advantages * eps_clip_c)
        loss = torch.where(advantages < 0, capped, loss)
    return loss, clipped


def tis_weights(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    low: float,
    high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance weights correcting engine -> learner drift (no gradient), and where the ratio is outside
    [low, high].

    token_*: ratio per token, exp(old - rollout); seq_*: per sequence, the geometric mean of its tokens'
    ratios, exp(mean(old - rollout)), given to each of its tokens. *_truncate: w = clamp(ratio, low,
    high); *_mask: w = ratio inside [low, high] and 0 outside (IcePop-style masking).
    """
    log_ratio = (old_logp - rollout_logp).detach()
    if mode.startswith("seq_"):
        per_seq = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_ratio = per_seq[:, None].expand_as(old_logp)
    ratio = torch.exp(log_ratio)
    outside = ((ratio < low) | (ratio > high)).float()
    if mode.endswith("_truncate"):
        return ratio.clamp(low, high), outside
    if mode.endswith("_mask"):
        return ratio * (1.0 - outside), outside
    raise ValueError(f"unknown tis_mode {mode!r}")


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, *, per_token_mode: bool, tokens: float, samples: float
) -> torch.Tensor:
    """Reduce a [b, t] per-token loss to this micro-batch's share of the global-batch loss.

    per_token_mode: sum over every counted token of the global batch / its token count.
    otherwise: each sample's mean over its tokens, summed, / the global batch's sample count.
    Summing the micro-batch shares (and data-parallel ranks) gives exactly the global-batch loss.
    """
    if per_token_mode:
        return masked_sum(per_token, mask) / max(tokens, 1.0)
    lengths = mask.sum(-1).clamp(min=1.0)
    return ((per_token * mask).sum(-1) / lengths).sum() / max(samples, 1.0)


def policy_objective(
    algo: AlgoConfig,
    *,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    tokens: float,
    samples: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """This micro-batch's loss share, its loss terms (shares too) and token sums for metrics.

    Loss shares add up over micro-batches and data-parallel ranks to the global-batch value; token sums
    are divided by the global count of masked tokens to give per-token means.
    """
    pg, clipped = ppo_clip_loss(
        logp, old_logp, advantages, algo.eps_clip, algo.eps_clip_high, algo.eps_clip_c
    )
    with torch.no_grad():
        engine_log_ratio = old_logp - rollout_logp
        sums = {
            "pg_clipfrac": masked_sum(clipped, mask),
            "ppo_kl": masked_sum(old_logp - logp.detach(), mask),
            "mismatch_kl": masked_sum(torch.expm1(engine_log_ratio) - engine_log_ratio, mask),
            "logprob_abs_diff": masked_sum(engine_log_ratio.abs(), mask),
        }
    if algo.use_tis:
        w, w_clipped = tis_weights(
            old_logp, rollout_logp, mask, algo.tis_mode, algo.tis_clip_low, algo.tis_clip
        )
        pg = pg * w
        sums["tis_weight"] = masked_sum(w, mask)
        sums["tis_clipfrac"] = masked_sum(w_clipped, mask)
    agg = {"per_token_mode": algo.calculate_per_token_loss, "tokens": tokens, "samples": samples}
    pg_loss = aggregate(pg, mask, **agg)
    loss = pg_loss
    shares = {"pg_loss": pg_loss.detach()}
    if ref_logp is not None:
        kl_loss = aggregate(kl_estimate(logp, ref_logp, algo.kl_loss_type), mask, **agg)
        shares["kl_loss"] = kl_loss.detach()
        if algo.kl_loss_coef:
            loss = loss + algo.kl_loss_coef * kl_loss
    if entropy is not None:
        entropy_loss = aggregate(entropy, mask, **agg)
        shares["entropy_loss"] = entropy_loss.detach()
        if algo.entropy_coef:
            loss = loss - algo.entropy_coef * entropy_loss
    shares["loss"] = loss.detach()
    return loss, shares, sums
