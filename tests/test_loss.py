"""The RL objective against formulas written out here, on random tensors."""

from __future__ import annotations

import math

import pytest
import torch

from engine.learner.advantages import group_advantages
from engine.learner.config import AlgoConfig
from engine.learner.loss import (
    aggregate,
    kl_estimate,
    policy_objective,
    ppo_clip_loss,
    tis_weights,
    token_logprobs,
)

g = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def test_token_logprobs_and_entropy() -> None:
    logits, targets, t = rand(2, 5, 11), torch.randint(0, 11, (2, 5), generator=g), 0.7
    p = torch.softmax(logits / t, -1)
    logp, entropy = token_logprobs(logits, targets, t, with_entropy=True)
    assert token_logprobs(logits, targets, t)[1] is None
    for b in range(2):
        for s in range(5):
            assert logp[b, s].item() == pytest.approx(math.log(p[b, s, targets[b, s]].item()), abs=1e-5)
            want = -sum(q * math.log(q) for q in p[b, s].tolist())
            assert entropy[b, s].item() == pytest.approx(want, abs=1e-5)


def test_grpo_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 2.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(rewards, groups)
    first = [1.0, 0.0, 0.0, 1.0]
    std = math.sqrt(sum((r - 0.5) ** 2 for r in first) / 3)  # unbiased
    assert adv[:4].tolist() == pytest.approx([(r - 0.5) / (std + 1e-6) for r in first], rel=1e-5)
    second = [0.5, 0.5, 0.5, 2.0]
    m = sum(second) / 4
    std2 = math.sqrt(sum((r - m) ** 2 for r in second) / 3)
    assert adv[4:].tolist() == pytest.approx([(r - m) / (std2 + 1e-6) for r in second], rel=1e-5)
    flat = group_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long))
    assert flat.tolist() == [0.0] * 4  # zero-variance groups carry no signal
    unnormalised = group_advantages(rewards, groups, std_normalize=False)
    assert unnormalised[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


def test_ppo_clip_by_hand() -> None:
    logp, old, adv = rand(64), rand(64), rand(64)
    loss, clipped = ppo_clip_loss(logp, old, adv, 0.2, 0.28)
    for i in range(64):
        r = math.exp(logp[i] - old[i])
        a = adv[i].item()
        unclipped, clip = -a * r, -a * min(max(r, 0.8), 1.28)
        assert loss[i].item() == pytest.approx(max(unclipped, clip), rel=1e-5, abs=1e-6)
        assert clipped[i].item() == float(clip > unclipped)


def test_dual_clip_caps_negative_advantages() -> None:
    logp, old, adv = rand(64) + 2, rand(64), rand(64)
    loss, _ = ppo_clip_loss(logp, old, adv, 0.2, None, 3.0)
    base, _ = ppo_clip_loss(logp, old, adv, 0.2)
    for i in range(64):
        a = adv[i].item()
        want = min(base[i].item(), -a * 3.0) if a < 0 else base[i].item()
        assert loss[i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_tis_token_modes() -> None:
    old, rollout, mask = rand(4, 25), rand(4, 25), torch.ones(4, 25)
    raw = torch.exp(old - rollout)
    outside = ((raw < 0.5) | (raw > 2.0)).float()
    w, out = tis_weights(old, rollout, mask, "token_truncate", 0.5, 2.0)
    assert torch.allclose(w, raw.clamp(0.5, 2.0)) and torch.equal(out, outside)
    w, out = tis_weights(old, rollout, mask, "token_mask", 0.5, 2.0)
    assert torch.allclose(w, torch.where(outside.bool(), torch.zeros_like(raw), raw)) and torch.equal(
        out, outside
    )
    assert not w.requires_grad


def test_tis_sequence_modes_use_the_geometric_mean() -> None:
    old, rollout = rand(3, 6) * 0.3, rand(3, 6) * 0.3
    mask = torch.tensor([[1.0] * 6, [1.0] * 3 + [0.0] * 3, [1.0] * 6])
    for mode in ("seq_truncate", "seq_mask"):
        w, out = tis_weights(old, rollout, mask, mode, 0.9, 1.1)
        for i in range(3):
            n = int(mask[i].sum())
            geo = math.exp(sum((old[i, t] - rollout[i, t]).item() for t in range(n)) / n)
            inside = 0.9 <= geo <= 1.1
            want = min(max(geo, 0.9), 1.1) if mode == "seq_truncate" else (geo if inside else 0.0)
            assert torch.allclose(w[i], torch.full((6,), want), atol=1e-5), (mode, i)
            assert out[i].tolist() == [0.0 if inside else 1.0] * 6


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_estimators(kind: str) -> None:
    logp, ref = rand(50), rand(50) * 6
    got = kl_estimate(logp, ref, kind)
    for i in range(50):
        x = (logp[i] - ref[i]).item()  # log pi/pi_ref
        want = {"k1": x, "k2": 0.5 * x * x, "k3": math.exp(-x) - 1 + x}.get(kind)
        if kind == "low_var_kl":
            want = min(max(math.exp(-x) - 1 + x, -10.0), 10.0)
        assert got[i].item() == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_aggregation_shares_sum_to_global_loss() -> None:
    per_token, mask = rand(6, 9), (torch.rand(6, 9, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    tokens, samples = mask.sum().item(), 6.0
    token_mean = (per_token * mask).sum() / mask.sum()
    sample_mean = torch.stack([(per_token[i] * mask[i]).sum() / mask[i].sum() for i in range(6)]).mean()
    for per_token_mode, want in ((True, token_mean), (False, sample_mean)):
        parts = [
            aggregate(
                per_token[i : i + 2],
                mask[i : i + 2],
                per_token_mode=per_token_mode,
                tokens=tokens,
                samples=samples,
            )
            for i in range(0, 6, 2)
        ]
        assert sum(parts).item() == pytest.approx(want.item(), rel=1e-5)


def test_objective_is_zero_ppo_kl_at_identical_weights_and_adds_terms() -> None:
    logp = rand(3, 4).requires_grad_()
    mask = torch.ones(3, 4)
    algo = AlgoConfig(use_kl_loss=True, kl_loss_coef=0.5, entropy_coef=0.1, use_tis=True)
    ref, entropy, adv = rand(3, 4), rand(3, 4).abs(), rand(3, 4)
    loss, shares, sums = policy_objective(
        algo,
        logp=logp,
        old_logp=logp.detach(),
        rollout_logp=logp.detach() - 0.1,
        advantages=adv,
        mask=mask,
        entropy=entropy,
        ref_logp=ref,
        tokens=12.0,
        samples=3.0,
    )
    assert sums["ppo_kl"].item() == 0.0
    assert shares["loss"].item() == pytest.approx(
        (shares["pg_loss"] + 0.5 * shares["kl_loss"] - 0.1 * shares["entropy_loss"]).item(), rel=1e-6
    )
    assert sums["tis_weight"].item() == pytest.approx(12 * math.exp(0.1), rel=1e-5)
    loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
