"""The RL objective, written as small pure functions over per-token tensors.

Notation: logp = log pi_theta(token) at the current weights; old = the learner's recompute before the
optimizer steps of this rollout (or the engine's log-probs with use_rollout_logprobs); rollout = the
engine's log-probs at sampling time; ref = the reference model's. All are log_softmax(logits / T)
of the sampled token over the full vocabulary. Masks are 1.0 on tokens that count and 0.0 elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

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


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped surrogate (to minimise) of a ratio, and a clip indicator.

    loss = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps_high)); with dual clip (eps_clip_c = c > 1),
    tokens with A < 0 are capped at -A c.
    """
    high = eps_clip if eps_clip_high is None else eps_clip_high
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + high)
    loss = torch.maximum(loss1, loss2)
    clipped = (loss2 > loss1).float()
    if eps_clip_c is not None:
        capped = torch.minimum(loss, -advantages * eps_clip_c)
        loss = torch.where(advantages < 0, capped, loss)
    return loss, clipped


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate of the token ratio exp(logp - old)."""
    return clipped_surrogate(torch.exp(logp - old_logp), advantages, eps_clip, eps_clip_high, eps_clip_c)


def gspo_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence ratio s_i = exp(mean over i's tokens of (logp - old)), given to each token as
    sg(s_i) * pi_t / sg(pi_t): its value is s_i and the gradient of a per-sample token mean of it is
    the gradient of s_i (the sequence-level objective)."""
    per_seq = ((logp - old_logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    log_ratio = per_seq.detach()[:, None] + logp - logp.detach()
    return torch.exp(log_ratio)


def cispo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CISPO: -sg(clip(ratio, 1 - eps_low, 1 + eps_high)) A logp. The importance weight is clipped, not
    the update, so every token keeps a gradient; the indicator marks tokens whose weight was clipped."""
    ratio = torch.exp(logp - old_logp).detach()
    weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return -weight * advantages * logp, (weight != ratio).float()


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, value_clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), and where
    the clipped term was the larger."""
    unclipped = (values - returns).square()
    if value_clip is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped)
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    clipped = (clipped_values - returns).square()
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).float()


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


CustomLoss = Callable[..., torch.Tensor]


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
    custom_loss: CustomLoss | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """This micro-batch's loss share, its loss terms (shares too) and token sums for metrics.

    The per-token policy term is chosen by algo.loss_type and the estimator (algo.policy_loss_kind):
    PPO's clipped surrogate, GSPO's on the sequence ratio, CISPO's, the SFT negative log-likelihood, or
    a custom function. Loss shares add up over micro-batches and data-parallel ranks to the global-batch
    value; token sums are divided by the global count of masked tokens to give per-token means.
    """
    with torch.no_grad():
        engine_log_ratio = old_logp - rollout_logp
        sums = {
            "ppo_kl": masked_sum(old_logp - logp.detach(), mask),
            "mismatch_kl": masked_sum(torch.expm1(engine_log_ratio) - engine_log_ratio, mask),
            "logprob_abs_diff": masked_sum(engine_log_ratio.abs(), mask),
        }
    clipped = None
    if algo.loss_type == "sft":
        pg = -logp
    elif algo.loss_type == "custom_loss":
        assert custom_loss is not None
        pg = custom_loss(
            logp=logp,
            old_logp=old_logp,
            rollout_logp=rollout_logp,
            ref_logp=ref_logp,
            advantages=advantages,
            mask=mask,
            entropy=entropy,
            algo=algo,
        )
        if not isinstance(pg, torch.Tensor) or pg.shape != logp.shape:
            got = tuple(pg.shape) if isinstance(pg, torch.Tensor) else type(pg).__name__
            raise ValueError(
                f"algo.custom_loss_function_path must return a per-token loss of shape {tuple(logp.shape)}, "
                f"got {got}"
            )
    elif algo.policy_loss_kind == "gspo":
        ratio = gspo_ratio(logp, old_logp, mask)
        pg, clipped = clipped_surrogate(ratio, advantages, algo.eps_clip, algo.eps_clip_high, algo.eps_clip_c)
    elif algo.policy_loss_kind == "cispo":
        high = algo.eps_clip if algo.eps_clip_high is None else algo.eps_clip_high
        pg, clipped = cispo_loss(logp, old_logp, advantages, algo.eps_clip, high)
    else:
        pg, clipped = ppo_clip_loss(
            logp, old_logp, advantages, algo.eps_clip, algo.eps_clip_high, algo.eps_clip_c
        )
    if clipped is not None:
        sums["pg_clipfrac"] = masked_sum(clipped, mask)
    if algo.use_tis and algo.loss_type != "sft":
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
    if ref_logp is not None and algo.use_kl_loss:
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
