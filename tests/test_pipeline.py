"""Pipeline parallelism: a learner split over stages computes what a single stage computes.

Two (or four) gloo ranks as Ray actors against one rank, from the same weights and samples: the
log-probs of compute_logprobs, two SGD steps' metrics (the second on recomputed old log-probs) and the
updated weights from export_hf, for a tied-embedding and an untied Qwen2 checkpoint, PPO's critic with
packed micro-batches, and tensor x pipeline parallelism; bad sizes are config errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray
import torch

from engine.config import load_config
from engine.errors import ConfigError
from engine.hf_config import load_hf_config
from engine.learner import hf_bridge
from engine.learner.config import (
    AlgoConfig,
    PerfConfig,
)
from engine.learner.group import LearnerGroup
from engine.learner.weights import load_hf_state
from tests.helpers import learner_spec, make_checkpoint, parallel_run_toml
from tests.test_learner import rollout

KL = AlgoConfig(use_kl_loss=True, kl_loss_coef=0.05)
PPO = AlgoConfig(advantage_estimator="ppo", kl_coef=0.05, critic_lr=0.1)


def run(ckpt, samples, *, ranks=1, tp=1, pp=1, algo=KL, packed=False):
    """compute_logprobs, then two SGD steps on the samples; (log-probs, per-step metrics, weights)."""
    longest = max(len(x.prompt_array) + x.response_len for x in samples)
    perf = PerfConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        micro_batch_size=3,  # 8 samples per step and rank: micro-batches of 3, 3 and 2 rows
        use_dynamic_batch_size=packed,
        max_tokens_per_gpu=2 * longest + 5 if packed else None,
    )
    spec = learner_spec(ckpt, perf=perf, algo=algo)
    return probe(LearnerGroup(ranks, spec), samples, "pp_rank", [r // (ranks // pp) for r in range(ranks)])


def probe(g: LearnerGroup, samples, rank_key: str, expected: list[int]):
    """The group's ranks checked for their place in the layout (info[rank_key]), then its log-probs of
    samples, the metrics of two training steps on them and its exported weights; the group is shut down."""
    try:
        assert [info[rank_key] for info in g.info] == expected
        logprobs = g.compute_logprobs(samples)
        metrics = g.train(samples, 2)
        weights = ray.get(g.export_weights())
    finally:
        g.shutdown()
    return logprobs, metrics, weights


def assert_same(result, reference) -> None:
    (logprobs, metrics, weights), (ref_logprobs, ref_metrics, ref_weights) = result, reference
    assert len(logprobs) == len(ref_logprobs)
    for a, b in zip(logprobs, ref_logprobs, strict=True):
        assert np.allclose(a, b, atol=1e-5)
    for step, (m, r) in enumerate(zip(metrics, ref_metrics, strict=True)):
        assert set(m) == set(r)
        for key, value in r.items():
            if not key.endswith("_time"):
                assert m[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    assert ref_metrics[1]["ppo_kl"] != 0.0 and ref_metrics[0]["grad_norm"] > 0
    assert set(weights) == set(ref_weights)
    for name, tensor in ref_weights.items():
        assert torch.allclose(weights[name], tensor, atol=1e-5), name


@pytest.fixture(scope="module")
def untied_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("untied") / "qwen2", tied=False, seed=4)


@pytest.fixture(scope="module")
def samples(tiny_ckpt):
    return rollout(tiny_ckpt)


@pytest.fixture(scope="module")
def tied_reference(ray_local, tiny_ckpt, samples):
    return run(tiny_ckpt, samples)


def test_two_stages_match_one_with_tied_embeddings(ray_local, tiny_ckpt, samples, tied_reference) -> None:
    result = run(tiny_ckpt, samples, ranks=2, pp=2)
    assert_same(result, tied_reference)
    initial = load_hf_state(str(tiny_ckpt))
    assert set(result[2]) == set(initial)  # the last stage's copy of the embeddings is exported once
    assert not torch.allclose(result[2]["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


def test_two_stages_match_one_with_untied_embeddings(ray_local, untied_ckpt, samples) -> None:
    assert_same(run(untied_ckpt, samples, ranks=2, pp=2), run(untied_ckpt, samples))


def test_ppo_critic_and_packed_micro_batches_over_two_stages(ray_local, tiny_ckpt, samples) -> None:
    reference = run(tiny_ckpt, samples, algo=PPO, packed=True)
    assert reference[1][0]["value_loss"] > 0 and reference[1][0]["critic_grad_norm"] > 0
    assert_same(run(tiny_ckpt, samples, ranks=2, pp=2, algo=PPO, packed=True), reference)


def test_tensor_times_pipeline_parallel(ray_local, tiny_ckpt, samples, tied_reference) -> None:
    assert_same(run(tiny_ckpt, samples, ranks=4, tp=2, pp=2), tied_reference)


def test_bad_pipeline_sizes_are_config_errors(tmp_path, tiny_ckpt) -> None:
    with pytest.raises(ConfigError, match="pipeline_model_parallel_size: must be > 0"):
        PerfConfig(pipeline_model_parallel_size=0).check()
    shape = hf_bridge.shape_of(load_hf_config(str(tiny_ckpt)))
    assert hf_bridge.layers_per_stage(shape, 2) == 1
    with pytest.raises(
        ConfigError, match=r"2 layers cannot be split evenly over pipeline_model_parallel_size=3"
    ):
        hf_bridge.layers_per_stage(shape, 3)
    path = parallel_run_toml(
        tmp_path / "run.toml", {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}, 6
    )
    with pytest.raises(
        ConfigError, match=r"learner_ranks=6 is not divisible by .* x perf.pipeline_model_parallel"
    ):
        load_config(path)
    path.write_text(path.read_text().replace("learner_ranks = 6", "learner_ranks = 12"))
    with pytest.raises(ConfigError, match=r"data-parallel size 3 .* / perf.pipeline_model_parallel_size=2\)"):
        load_config(path)
