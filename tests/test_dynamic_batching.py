"""Dynamic batching: packed micro-batches cut by token count train exactly like padded micro-batches.

The reference runs padded micro-batches through Megatron's own attention ("local"); the packed runs use
the SDPA backend with perf.use_dynamic_batch_size, so both the attention and the packing are checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import ConfigError
from engine.learner.config import (
    AlgoConfig,
    PerfConfig,
)
from engine.learner.group import LearnerGroup
from engine.learner.weights import load_hf_state
from engine.wire import Sample
from tests.helpers import learner_spec, make_checkpoint
from tests.test_learner import rollout

CASES = {
    "grpo-per-sample-kl": AlgoConfig(use_kl_loss=True, kl_loss_coef=0.05),
    "grpo-per-token-entropy": AlgoConfig(calculate_per_token_loss=True, entropy_coef=0.01),
    "ppo-per-sample-kl-shaping": AlgoConfig(advantage_estimator="ppo", kl_coef=0.05, critic_lr=0.1),
    "ppo-per-token": AlgoConfig(advantage_estimator="ppo", calculate_per_token_loss=True, critic_lr=0.1),
}


def train(ckpt, ref, samples, algo: AlgoConfig, perf: PerfConfig):
    """Two optimizer steps (the second uses recomputed old log-probs); metrics and final weights."""
    import ray

    spec = learner_spec(ckpt, perf=perf, algo=algo, ref=ref if algo.needs_reference else None)
    g = LearnerGroup(1, spec)
    try:
        metrics = g.train(samples, 2)
        weights = ray.get(g.export_weights())
    finally:
        g.shutdown()
    return metrics, weights


@pytest.fixture(scope="module")
def ref_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ref") / "qwen2", seed=3)


@pytest.fixture(scope="module")
def samples(tiny_ckpt):
    """Generated samples cut to varied response lengths, some with tokens left out of the loss."""
    xs = []
    for i, x in enumerate(rollout(tiny_ckpt)):
        n = min(x.response_len, 2 + 5 * i % 9)
        mask = np.ones(n, dtype=np.uint8)
        mask[1 : n // 2 if i % 3 == 0 else 1] = 0
        xs.append(
            Sample.build(
                prompt_ids=x.prompt_array,
                response_ids=x.response_array[:n],
                rollout_logprobs=x.logprob_array[:n],
                versions=x.version_array[:n],
                loss_mask=mask,
                **{k: getattr(x, k) for k in ("group_id", "index", "group_size", "prompt_index", "reward")},
                status="truncated",
            )
        )
    assert len({len(x.prompt_array) + x.response_len for x in xs}) > 6  # padded batches hold padding
    return xs


@pytest.mark.parametrize("name", list(CASES))
def test_packed_dynamic_batches_train_like_padded_batches(
    ray_local, tiny_ckpt, ref_ckpt, samples, name
) -> None:
    algo = CASES[name]
    longest = max(len(x.prompt_array) + x.response_len for x in samples)
    padded = PerfConfig(micro_batch_size=3, attention_backend="local")
    packed = PerfConfig(use_dynamic_batch_size=True, max_tokens_per_gpu=2 * longest + 5)
    ref_metrics, ref_weights = train(tiny_ckpt, ref_ckpt, samples, algo, padded)
    metrics, weights = train(tiny_ckpt, ref_ckpt, samples, algo, packed)
    for step, (m, r) in enumerate(zip(metrics, ref_metrics, strict=True)):
        assert set(m) == set(r)
        for key, value in r.items():
            if key.endswith("_time"):
                continue
            assert m[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    assert ref_metrics[1]["ppo_kl"] != 0.0  # the second step does use recomputed old log-probs
    if algo.needs_critic:
        assert ref_metrics[0]["value_loss"] > 0
    initial = load_hf_state(str(tiny_ckpt))
    assert any(not torch.allclose(ref_weights[k], initial[k], atol=1e-4) for k in initial)
    for k, tensor in ref_weights.items():
        assert torch.allclose(weights[k], tensor, atol=1e-5), k


def test_a_sample_over_the_token_budget_is_an_error(ray_local, tiny_ckpt, ref_ckpt, samples) -> None:
    longest = max(len(x.prompt_array) + x.response_len for x in samples)
    perf = PerfConfig(use_dynamic_batch_size=True, max_tokens_per_gpu=longest - 1)
    with pytest.raises(Exception, match=rf"max_tokens_per_gpu: sample \d+ has {longest} tokens"):
        train(tiny_ckpt, ref_ckpt, samples, AlgoConfig(), perf)


def test_dynamic_batching_needs_a_token_budget_and_sdpa() -> None:
    with pytest.raises(ConfigError, match="max_tokens_per_gpu: is required"):
        PerfConfig(use_dynamic_batch_size=True).check()
    with pytest.raises(ConfigError, match="attention_backend"):
        PerfConfig(use_dynamic_batch_size=True, max_tokens_per_gpu=64, attention_backend="local").check()
    with pytest.raises(ConfigError, match="max_tokens_per_gpu: must be > 0"):
        PerfConfig(max_tokens_per_gpu=0).check()
