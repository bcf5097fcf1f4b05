"""Advantage estimators and the loss forms of every estimator against formulas written out here, on
random tensors with padding and masks."""

from __future__ import annotations

import math

import pytest
import torch

from engine.errors import ConfigError
from engine.learner.advantages import (
    assign_advantages,
    discounted_returns,
    gae,
    group_advantages,
    token_rewards,
    whiten,
    whiten_stats,
)
from engine.learner.batching import MicroBatch
from engine.learner.config import AlgoConfig
from engine.learner.loss import (
    cispo_loss,
    clipped_surrogate,
    gspo_ratio,
    kl_estimate,
    policy_objective,
    ppo_clip_loss,
    value_loss,
)

g = torch.Generator().manual_seed(1)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def layout(prompts: list[int], responses: list[int]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """A span mask in shifted coordinates (response k of a prompt of length p sits at p - 1 + k) and
    each row's (start, length); rows are right-padded to a common length."""
    t = max(p + r for p, r in zip(prompts, responses)) - 1
    span = torch.zeros(len(prompts), t)
    cuts = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        span[i, p - 1 : p - 1 + r] = 1.0
        cuts.append((p - 1, r))
    return span, cuts


def test_group_advantages_centering_and_std_switches() -> None:
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0, 2.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    for center in (True, False):
        for std_normalize in (True, False):
            adv = group_advantages(rewards, groups, center=center, std_normalize=std_normalize)
            for gid in (0, 1):
                r = [float(x) for x, k in zip(rewards, groups) if k == gid]
                mean = sum(r) / 3
                std = math.sqrt(sum((x - mean) ** 2 for x in r) / 2)
                want = [((x - mean) if center else x) / ((std + 1e-6) if std_normalize else 1.0) for x in r]
                got = [float(a) for a, k in zip(adv, groups) if k == gid]
                assert got == pytest.approx(want, rel=1e-5)


def test_token_rewards_and_discounted_returns_by_hand() -> None:
    span, cuts = layout([3, 1, 5, 2], [4, 6, 1, 3])
    scalar, kl, beta, gamma = rand(4), rand(*span.shape), 0.3, 0.9
    per_token = token_rewards(scalar, kl, beta, span)
    returns = discounted_returns(per_token, span, gamma)
    for i, (start, n) in enumerate(cuts):
        r = [-beta * float(kl[i, start + k]) + (float(scalar[i]) if k == n - 1 else 0.0) for k in range(n)]
        want = [sum(gamma ** (s - k) * r[s] for s in range(k, n)) for k in range(n)]
        assert returns[i, start : start + n].tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
        outside = torch.ones(span.shape[1], dtype=torch.bool)
        outside[start : start + n] = False
        assert returns[i, outside].abs().sum() == 0 and per_token[i, outside].abs().sum() == 0


def test_gae_by_hand() -> None:
    span, cuts = layout([2, 4, 1], [5, 2, 7])
    rewards, values, gamma, lam = rand(*span.shape) * span, rand(*span.shape), 0.95, 0.8
    adv, returns = gae(rewards, values, span, gamma, lam)
    for i, (start, n) in enumerate(cuts):
        v = [float(values[i, start + k]) for k in range(n)] + [0.0]
        r = [float(rewards[i, start + k]) for k in range(n)]
        delta = [r[k] + gamma * v[k + 1] - v[k] for k in range(n)]
        want = [sum((gamma * lam) ** (s - k) * delta[s] for s in range(k, n)) for k in range(n)]
        assert adv[i, start : start + n].tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert returns[i, start : start + n].tolist() == pytest.approx(
            [a + b for a, b in zip(want, v[:n])], rel=1e-5, abs=1e-6
        )
    assert (adv * (1 - span)).abs().sum() == 0 and (returns * (1 - span)).abs().sum() == 0


def test_whitening_over_parts_equals_whitening_of_the_whole() -> None:
    x, mask = rand(6, 9), (torch.rand(6, 9, generator=g) > 0.3).float()
    whole = whiten(x, mask, whiten_stats(x, mask))
    parts = whiten_stats(x[:2], mask[:2]) + whiten_stats(x[2:], mask[2:])  # as summed over ranks
    assert torch.allclose(whiten(x, mask, parts), whole, atol=1e-6)
    kept = whole[mask > 0]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert kept.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-4)
    assert whole[mask == 0].abs().sum() == 0


def micro_batch(prompts: list[int], responses: list[int], first: int) -> MicroBatch:
    span, _ = layout(prompts, responses)
    b, t = span.shape
    mask = span.clone()
    mask[0, prompts[0] - 1] = 0.0  # a masked-out token inside a response (partial-rollout masking)
    mb = MicroBatch(
        tokens=torch.zeros(b, t + 1, dtype=torch.long),
        positions=torch.zeros(b, t + 1, dtype=torch.long),
        targets=torch.zeros(b, t, dtype=torch.long),
        mask=mask,
        span=span,
        rollout_logp=-rand(b, t).abs(),
        index=torch.arange(first, first + b),
    )
    mb.old_logp, mb.ref_logp, mb.old_values = -rand(b, t).abs(), -rand(b, t).abs(), rand(b, t) * span
    return mb


def rollout() -> tuple[list[MicroBatch], torch.Tensor, torch.Tensor]:
    mbs = [micro_batch([2, 3, 1], [4, 2, 3], 0), micro_batch([1, 4, 2], [5, 3, 1], 3)]
    return mbs, torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 0, 1, 1, 1])


def rows(mbs: list[MicroBatch], name: str) -> list[list[float]]:
    """Each sample's per-token values of a micro-batch tensor over its response span."""
    out = []
    for mb in mbs:
        for i in range(mb.span.shape[0]):
            out.append(getattr(mb, name)[i][mb.span[i] > 0].tolist())
    return out


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


@pytest.mark.parametrize("estimator", ["grpo", "gspo", "cispo"])
def test_group_estimators_with_kl_shaping(estimator: str) -> None:
    mbs, rewards, groups = rollout()
    algo = AlgoConfig(advantage_estimator=estimator, kl_coef=0.1, kl_loss_type="k1")
    assign_advantages(algo, mbs, rewards, groups, identity)
    seq_kl = torch.cat([((mb.old_logp - mb.ref_logp) * mb.mask).sum(-1) for mb in mbs])
    want = group_advantages(rewards - 0.1 * seq_kl, groups)
    for adv, per_tokens in zip(want.tolist(), rows(mbs, "advantages")):
        assert per_tokens == pytest.approx([adv] * len(per_tokens), rel=1e-5)


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_plus_plus(baseline: bool) -> None:
    mbs, rewards, groups = rollout()
    name = "reinforce_plus_plus_baseline" if baseline else "reinforce_plus_plus"
    algo = AlgoConfig(advantage_estimator=name, kl_coef=0.05, kl_loss_type="k3", gamma=0.9)
    assign_advantages(algo, mbs, rewards, groups, identity)
    scalar = group_advantages(rewards, groups, std_normalize=False) if baseline else rewards
    raw = []
    k = 0
    for mb in mbs:
        kl = kl_estimate(mb.old_logp, mb.ref_logp, "k3") * mb.mask
        for i in range(mb.span.shape[0]):
            r = (-0.05 * kl[i][mb.span[i] > 0]).tolist()
            r[-1] += float(scalar[k])
            raw.append([sum(0.9 ** (s - t) * r[s] for s in range(t, len(r))) for t in range(len(r))])
            k += 1
    masks = rows(mbs, "mask")
    kept = [x for row, m in zip(raw, masks) for x, keep in zip(row, m) if keep]
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((x - mean) ** 2 for x in kept) / len(kept))
    for got, row, m in zip(rows(mbs, "advantages"), raw, masks):
        want = [(x - mean) / (std + 1e-8) * keep for x, keep in zip(row, m)]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_ppo_advantages_are_whitened_gae_and_returns_are_unwhitened() -> None:
    mbs, rewards, groups = rollout()
    algo = AlgoConfig(advantage_estimator="ppo", gamma=1.0, lambd=0.9)
    raw = []
    for mb, r in zip(mbs, (rewards[:3], rewards[3:])):
        adv, ret = gae(token_rewards(r, None, 0.0, mb.span), mb.old_values, mb.span, 1.0, 0.9)
        raw.append((adv, ret))
    assign_advantages(algo, mbs, rewards, groups, identity)
    stats = sum(whiten_stats(adv, mb.mask) for (adv, _), mb in zip(raw, mbs))
    for (adv, ret), mb in zip(raw, mbs):
        assert torch.allclose(mb.returns, ret)
        assert torch.allclose(mb.advantages, whiten(adv, mb.mask, stats), atol=1e-6)
    no_whiten = AlgoConfig(advantage_estimator="ppo", lambd=0.9, advantage_whitening=False)
    assign_advantages(no_whiten, mbs, rewards, groups, identity)
    assert torch.allclose(mbs[0].advantages, raw[0][0])


def test_clipped_loss_gradient_matches_finite_differences_and_the_formula() -> None:
    logp = (rand(40) * 0.3).double().requires_grad_()
    old, adv = (rand(40) * 0.3).double(), rand(40).double()
    assert torch.autograd.gradcheck(lambda x: ppo_clip_loss(x, old, adv, 0.2, 0.28, 3.0)[0], (logp,))
    loss, clipped = ppo_clip_loss(logp, old, adv, 0.2, 0.28)
    loss.sum().backward()
    ratio = torch.exp(logp.detach() - old)
    want = torch.where(clipped > 0, torch.zeros_like(ratio), -adv * ratio)
    assert torch.allclose(logp.grad, want)


def test_gspo_uses_the_sequence_ratio_for_value_and_gradient() -> None:
    span, _ = layout([2, 1, 3], [3, 5, 2])
    mask, adv = span, (rand(3)[:, None] * span)
    logp = (-rand(*span.shape).abs() * span).double().requires_grad_()
    old = (logp.detach() + rand(*span.shape).double() * 0.05) * span
    ratio = gspo_ratio(logp, old, mask)
    seq = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    assert torch.allclose((ratio * mask), (seq.detach()[:, None] * mask))
    per_token, _ = clipped_surrogate(ratio, adv.double(), 0.2)
    mine = ((per_token * mask).sum(-1) / mask.sum(-1)).sum()
    (grad_mine,) = torch.autograd.grad(mine, logp)
    a = (adv.sum(-1) / span.sum(-1)).double()  # the sequence's advantage
    seq_loss = torch.maximum(-a * seq, -a * seq.clamp(0.8, 1.2)).sum()
    (grad_seq,) = torch.autograd.grad(seq_loss, logp)
    assert torch.allclose(grad_mine, grad_seq)


def test_cispo_keeps_a_gradient_through_clipped_weights() -> None:
    logp = (rand(50) * 0.5).requires_grad_()
    old, adv = rand(50) * 0.5, rand(50)
    loss, clipped = cispo_loss(logp, old, adv, 0.2, 0.28)
    loss.sum().backward()
    ratio = torch.exp(logp.detach() - old)
    weight = ratio.clamp(0.8, 1.28)
    assert torch.allclose(logp.grad, -weight * adv)
    assert torch.equal(clipped, ((ratio < 0.8) | (ratio > 1.28)).float())
    assert clipped.sum() > 0 and (logp.grad[clipped > 0] != 0).all()


def test_value_loss_by_hand() -> None:
    v, v_old, ret = rand(30), rand(30), rand(30)
    loss, clipped = value_loss(v, v_old, ret, 0.2)
    for i in range(30):
        a = (v[i] - ret[i]) ** 2
        b = (v_old[i] + (v[i] - v_old[i]).clamp(-0.2, 0.2) - ret[i]) ** 2
        assert loss[i].item() == pytest.approx(0.5 * max(a, b).item(), rel=1e-5)
        assert clipped[i].item() == float(b > a)
    assert torch.allclose(value_loss(v, v_old, ret, None)[0], 0.5 * (v - ret) ** 2)


def objective(
    algo: AlgoConfig, **extra: object
) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    logp = -rand(3, 5).abs().requires_grad_()
    adv = rand(3, 5)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    loss, shares, _ = policy_objective(
        algo,
        logp=logp,
        old_logp=logp.detach() + 0.01,
        rollout_logp=logp.detach(),
        advantages=adv,
        mask=mask,
        entropy=None,
        ref_logp=None,
        tokens=float(mask.sum()),
        samples=3.0,
        **extra,
    )
    return loss, shares, logp, adv, mask


def test_sft_loss_is_the_negative_log_likelihood() -> None:
    algo = AlgoConfig(loss_type="sft", calculate_per_token_loss=True, use_kl_loss=False)
    logp = -rand(3, 5).abs().requires_grad_()
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    loss, _, sums = policy_objective(
        algo,
        logp=logp,
        old_logp=logp.detach(),
        rollout_logp=logp.detach(),
        advantages=rand(3, 5),  # ignored: SFT imitates every token alike
        mask=mask,
        entropy=None,
        ref_logp=None,
        tokens=float(mask.sum()),
        samples=3.0,
    )
    assert loss.item() == pytest.approx((-(logp * mask).sum() / mask.sum()).item(), rel=1e-6)
    assert "pg_clipfrac" not in sums and "tis_weight" not in sums


def test_custom_loss_by_import_path_and_its_shape_check() -> None:
    from tests.losses_custom import reinforce, wrong_shape

    algo = AlgoConfig(loss_type="custom_loss", custom_loss_function_path="tests.losses_custom:reinforce")
    loss, shares, logp, adv, mask = objective(algo, custom_loss=reinforce)
    per_sample = ((-adv * logp * mask).sum(-1) / mask.sum(-1)).mean()  # aggregated like the built-ins
    assert loss.item() == pytest.approx(per_sample.item(), rel=1e-6)
    assert shares["pg_loss"].item() == pytest.approx(loss.item())
    with pytest.raises(ValueError, match="per-token loss of shape"):
        objective(algo, custom_loss=wrong_shape)


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"use_kl_loss": True, "kl_coef": 0.1}, "kl_coef"),
        ({"loss_type": "custom_loss"}, "custom_loss_function_path"),
        ({"custom_loss_function_path": "x:y"}, "custom_loss_function_path"),
        ({"gamma": 1.5}, "gamma"),
        ({"lambd": -0.1}, "lambd"),
        ({"loss_type": "sft", "use_tis": True}, "use_tis"),
        ({"value_clip": 0.0}, "value_clip"),
        ({"critic_lr": -1.0}, "critic_lr"),
    ],
)
def test_algo_value_errors_name_the_key(fields: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        AlgoConfig(**fields).check()
    assert (err.value.section, err.value.key) == ("algo", key)
