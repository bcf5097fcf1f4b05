"""The Megatron learner against the HF model and against itself under tensor and data parallelism.

Learner ranks are real Ray actors running Megatron-core on gloo; checkpoints are tiny random HF models.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.errors import ConfigError
from engine.hf_config import load_hf_config
from engine.learner import hf_bridge
from engine.learner.config import (
    AlgoConfig,
    OptimizerConfig,
    PerfConfig,
)
from engine.learner.group import LearnerGroup
from engine.learner.weights import load_hf_state
from engine.rollout.hf_engine import HFEngine
from engine.wire import GenerateRequest, Sample, SamplingParams
from tests.helpers import FAMILIES, learner_spec, make_checkpoint, prompt_ids


def group(ckpt, *, ranks=1, tp=1, micro=4, algo=None, optimizer=None, ref=None) -> LearnerGroup:
    spec = learner_spec(
        ckpt,
        perf=PerfConfig(tensor_model_parallel_size=tp, micro_batch_size=micro),
        algo=algo,
        optimizer=optimizer or OptimizerConfig(lr=1e-3),
        ref=ref,
    )
    return LearnerGroup(ranks, spec)


def rollout(ckpt, groups=4, n=4) -> list[Sample]:
    engine = HFEngine(str(ckpt), seed=0)
    texts = ["1+2", "45+67", "hello", "9+9", "abc", "77+1"]
    out = []
    for g in range(groups):
        ids = prompt_ids(ckpt, texts[g % len(texts)])
        reqs = [
            GenerateRequest(
                rid=g * n + i, prompt_ids=ids, params=SamplingParams(max_new_tokens=10), seed=g * 100 + i
            )
            for i in range(n)
        ]
        for i, r in enumerate(engine.generate(reqs)):
            out.append(
                Sample.build(
                    prompt_ids=ids,
                    response_ids=r.token_ids,
                    rollout_logprobs=r.logprobs,
                    versions=r.versions,
                    group_id=g,
                    index=i,
                    group_size=n,
                    prompt_index=g,
                    reward=float((g + i) % 3 == 0),
                    status="completed" if r.finish_reason == "stop" else "truncated",
                )
            )
    return out


@pytest.fixture(scope="module")
def samples(tiny_ckpt):
    return rollout(tiny_ckpt)


@pytest.fixture(scope="module")
def single(ray_local, tiny_ckpt):
    g = group(tiny_ckpt)
    yield g
    g.shutdown()


def test_conversion_round_trip_is_identity_for_any_tp(tmp_path) -> None:
    for family in FAMILIES:
        for tied in (True, False):
            path = make_checkpoint(tmp_path / f"{family}-{tied}", family, tied=tied)
            state = load_hf_state(str(path))
            for tp in (1, 2):
                shape = hf_bridge.shape_of(load_hf_config(str(path)), tp=tp)
                for p in hf_bridge.param_maps(shape):
                    shards = [
                        hf_bridge.to_megatron(p, [state[n] for n in p.hf], shape, r, tp) for r in range(tp)
                    ]
                    for name, back in zip(p.hf, hf_bridge.to_hf(p, shards, shape), strict=True):
                        assert torch.equal(back, state[name]), (family, tied, tp, name)


def test_rope_theta_is_read_and_overridable(tmp_path) -> None:
    path = make_checkpoint(tmp_path / "rope", rope_theta=1e6)
    assert hf_bridge.rope_parameters(load_hf_config(str(path)))["rope_theta"] == 1e6
    overridden = load_hf_config(str(path), {"rope_theta": 5e5, "rms_norm_eps": 1e-5})
    assert hf_bridge.rope_parameters(overridden)["rope_theta"] == 5e5 and overridden.rms_norm_eps == 1e-5
    with pytest.raises(ConfigError, match=r"\[model\] overrides.no_such_field"):
        load_hf_config(str(path), {"no_such_field": 1})


def test_unsupported_architecture_is_a_clear_error(tiny_ckpt) -> None:
    config = load_hf_config(str(tiny_ckpt))
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(Exception, match="supported: Qwen2ForCausalLM, LlamaForCausalLM, Qwen3ForCausalLM"):
        hf_bridge.shape_of(config)


def test_engine_and_learner_logprobs_agree(single, samples) -> None:
    learner = single.compute_logprobs(samples)
    diffs = np.concatenate([lp - x.logprob_array for lp, x in zip(learner, samples, strict=True)])
    assert len(diffs) > 20
    assert np.abs(diffs).mean() < 1e-4


def test_export_to_engine_gives_hf_logits(single, tiny_ckpt, samples) -> None:
    import ray

    exported = ray.get(single.export_weights())
    reference = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    for name, tensor in reference.named_parameters():
        assert torch.equal(exported[name], tensor.detach()), name
    engine = HFEngine(str(tiny_ckpt))
    engine.load_weights({k: v * 0 for k, v in exported.items()}, version=1)  # scramble, then restore
    engine.load_weights(exported, version=2)
    ids = torch.tensor([list(samples[0].prompt_array) + list(samples[0].response_array)])
    with torch.no_grad():
        assert torch.allclose(engine.model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize(
    "family, tied, rope_theta", [("llama", False, 5e5), ("qwen3", True, 1e6), ("qwen2", False, 1e6)]
)
def test_megatron_forward_matches_hf_for_each_family(ray_local, tmp_path, family, tied, rope_theta) -> None:
    path = make_checkpoint(tmp_path / family, family, tied=tied, seed=3, rope_theta=rope_theta)
    xs = rollout(path, groups=2, n=2)
    g = group(path)
    try:
        learner = g.compute_logprobs(xs)
    finally:
        g.shutdown()
    diffs = np.concatenate([lp - x.logprob_array for lp, x in zip(learner, xs, strict=True)])
    assert np.abs(diffs).max() < 1e-4


def test_first_step_ppo_kl_is_exactly_zero_and_weights_move(ray_local, tiny_ckpt, samples) -> None:
    import ray

    g = group(tiny_ckpt, algo=AlgoConfig(use_kl_loss=True, kl_loss_coef=0.01))
    try:
        before = ray.get(g.export_weights())
        steps = g.train(samples, 2)
        after = ray.get(g.export_weights())
    finally:
        g.shutdown()
    assert steps[0]["ppo_kl"] == 0.0 and steps[0]["kl_loss"] == 0.0
    assert steps[1]["ppo_kl"] != 0.0 and steps[1]["kl_loss"] > 0.0
    assert steps[0]["grad_norm"] > 0 and steps[0]["mismatch_kl"] < 1e-5
    moved = sum(float((after[k] - before[k]).abs().sum()) for k in before)
    assert moved > 0


def test_qwen3_tensor_parallel_keeps_qk_norms_in_step(ray_local, tmp_path) -> None:
    """QK norms act on each rank's heads only; their gradients are summed over TP ranks (as Megatron does)."""
    path = make_checkpoint(tmp_path / "qwen3", "qwen3", tied=False, seed=5)
    xs = rollout(path, groups=2, n=4)
    _, ref_metrics, ref_weights = _train_once(path, xs)
    _, metrics, weights = _train_once(path, xs, ranks=2, tp=2)
    assert metrics["grad_norm"] == pytest.approx(ref_metrics["grad_norm"], rel=1e-4)
    for name, tensor in ref_weights.items():
        assert torch.allclose(weights[name], tensor, atol=1e-5), name


def _train_once(ckpt, samples, **kw):
    """One optimizer step. SGD keeps the update linear in the gradient: Adam's first step, about
    lr * sign(g), would turn rounding noise on near-zero gradients into lr-sized differences."""
    import ray

    g = group(ckpt, optimizer=OptimizerConfig(optimizer="sgd", lr=0.05), **kw)
    try:
        logprobs = g.compute_logprobs(samples)
        metrics = g.train(samples, 1)[0]
        weights = ray.get(g.export_weights())
    finally:
        g.shutdown()
    return logprobs, metrics, weights


@pytest.fixture(scope="module")
def reference_step(ray_local, tiny_ckpt, samples):
    return _train_once(tiny_ckpt, samples)


@pytest.mark.parametrize("ranks, tp", [(2, 2), (2, 1)], ids=["tensor-parallel-2", "data-parallel-2"])
def test_parallel_learner_matches_single_rank(
    ray_local, tiny_ckpt, samples, reference_step, ranks, tp
) -> None:
    ref_logprobs, ref_metrics, ref_weights = reference_step
    logprobs, metrics, weights = _train_once(tiny_ckpt, samples, ranks=ranks, tp=tp)
    for a, b in zip(logprobs, ref_logprobs, strict=True):
        assert np.allclose(a, b, atol=1e-5)
    for key in ("loss", "pg_loss", "grad_norm", "entropy", "pg_clipfrac"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-6), key
    for name, tensor in ref_weights.items():
        assert torch.allclose(weights[name], tensor, atol=1e-5), name


ESTIMATORS = {
    "grpo-kl-shaping": AlgoConfig(kl_coef=0.05),
    "gspo": AlgoConfig(advantage_estimator="gspo", eps_clip=3e-4, eps_clip_high=4e-4),
    "cispo": AlgoConfig(advantage_estimator="cispo", eps_clip_high=0.28),
    "reinforce_plus_plus": AlgoConfig(advantage_estimator="reinforce_plus_plus", kl_coef=0.05, gamma=0.99),
    "reinforce_plus_plus_baseline": AlgoConfig(advantage_estimator="reinforce_plus_plus_baseline"),
    "ppo": AlgoConfig(advantage_estimator="ppo", kl_coef=0.05, lambd=0.9, critic_lr=0.1),
    "sft": AlgoConfig(loss_type="sft"),
    "custom": AlgoConfig(loss_type="custom_loss", custom_loss_function_path="tests.losses_custom:reinforce"),
}
# Estimators whose advantages need sums over data-parallel ranks (KL-shaped group rewards, whitening).
CROSS_RANK = ("grpo-kl-shaping", "reinforce_plus_plus", "ppo")
# At the first step of a rollout the ratio is exactly 1 and nothing is clipped, where GSPO's sequence
# ratio, CISPO's clipped weight and vanilla policy gradient all have GRPO's gradient.
SAME_AS_GRPO_ON_POLICY = ("gspo", "cispo", "custom")


@pytest.fixture(scope="module")
def ref_ckpt(tmp_path_factory):
    """A reference model other than the actor, so that KL reward shaping has something to shape."""
    return make_checkpoint(tmp_path_factory.mktemp("ref") / "qwen2", seed=3)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_and_loss_type_trains(
    ray_local, tiny_ckpt, ref_ckpt, samples, reference_step, name
) -> None:
    """One step with each estimator / loss type: finite metrics, GRPO's update where theory says so and a
    different one elsewhere; where advantages need cross-rank sums, data parallelism gives the same step."""
    algo = ESTIMATORS[name]
    ref = ref_ckpt if algo.needs_reference else None
    _, metrics, weights = _train_once(tiny_ckpt, samples, algo=algo, ref=ref)
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    ref_weights = reference_step[2]
    same = all(torch.allclose(weights[k], ref_weights[k], atol=1e-6) for k in weights)
    assert same == (name in SAME_AS_GRPO_ON_POLICY)
    if name == "ppo":
        for key in ("value_loss", "vf_clipfrac", "values", "returns", "critic_grad_norm", "critic_lr"):
            assert key in metrics, key
        assert metrics["critic_lr"] == pytest.approx(0.1) and metrics["value_loss"] > 0
    if name in ("reinforce_plus_plus", "ppo"):  # whitened over the rollout's tokens
        assert metrics["advantages"] == pytest.approx(0.0, abs=1e-5)
    if name in CROSS_RANK:
        _, dp_metrics, dp_weights = _train_once(tiny_ckpt, samples, algo=algo, ref=ref, ranks=2)
        for key in ("loss", "pg_loss", "grad_norm", "advantages"):
            assert dp_metrics[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-6), key
        for k, tensor in weights.items():
            assert torch.allclose(dp_weights[k], tensor, atol=1e-5), k


def test_weight_buckets_hold_every_tensor_once_within_the_size(ray_local, tiny_ckpt, samples) -> None:
    """The push's buckets: each at most the buffer size (unless one tensor is larger), together exactly
    the exported weights; an engine given the buckets ends with the same weights as given the dict."""
    import ray

    from engine.rollout.config import InferenceConfig
    from engine.rollout.engines import EmbeddedEngineActor

    g = group(tiny_ckpt)
    try:
        g.train(samples, 1)  # weights that differ from the checkpoint's
        full = ray.get(g.export_weights())
        limit = 64 * 1024
        refs = ray.get(g.export_weight_buckets(limit))
        buckets = ray.get(refs)
    finally:
        g.shutdown()
    assert len(buckets) > 2
    names = [name for bucket in buckets for name in bucket]
    assert sorted(names) == sorted(full) and len(names) == len(set(names))
    for bucket in buckets:
        size = sum(t.numel() * t.element_size() for t in bucket.values())
        assert size <= limit or len(bucket) == 1
        for name, tensor in bucket.items():
            assert torch.equal(tensor, full[name])
    engine = EmbeddedEngineActor(str(tiny_ckpt), InferenceConfig(batch_wait_ms=0.0), 0, 1, {})

    async def push() -> int:
        return await engine.update_weights(refs, 7)

    assert asyncio.run(push()) == 7
    state = engine.engine.state_dict()
    for name, tensor in full.items():
        assert torch.equal(state[name], tensor), name
