"""Context parallelism: two CP ranks compute what one rank computes.

The chunk split and merge on their own; then two gloo ranks as Ray actors with context_parallel_size = 2
against one rank, from the same weights and samples: the log-probs of compute_logprobs, two SGD steps'
metrics (the second on recomputed old log-probs) and the updated weights from export_hf, for padded and
packed micro-batches, with a KL loss against a reference model and with PPO's critic; four ranks for CP
x DP, CP x TP and CP x PP; unsupported combinations (CP x EP, the 'local' attention backend) are config
errors naming the key.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import load_config
from engine.errors import ConfigError
from engine.learner.config import AlgoConfig, PerfConfig
from engine.learner.context_parallel import (
    chunk_index,
    local_index,
    restore_order,
    rope_on_this_rank,
    round_up,
)
from engine.learner.group import LearnerGroup
from tests.helpers import learner_spec, parallel_run_toml
from tests.test_learner import rollout
from tests.test_pipeline import assert_same, probe

KL = AlgoConfig(use_kl_loss=True, kl_loss_coef=0.05)
PPO = AlgoConfig(advantage_estimator="ppo", kl_coef=0.05, critic_lr=0.1)


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_chunk_split_covers_every_position_once_and_merges_back(cp) -> None:
    lengths = [round_up(n, cp) for n in (1, 5, 12, 7)]
    assert all(n % (2 * cp) == 0 and n >= 1 for n in lengths)
    parts = [local_index(lengths, cp, r) for r in range(cp)]
    assert all(len(p) == sum(lengths) // cp for p in parts)  # balanced
    assert sorted(torch.cat(parts).tolist()) == list(range(sum(lengths)))
    # Rank r holds chunks r and 2 cp - 1 - r of each sequence.
    c = lengths[1] // (2 * cp)
    assert chunk_index(lengths[1], cp, 0).tolist() == [*range(c), *range(lengths[1] - c, lengths[1])]
    row = torch.arange(100, 100 + sum(lengths))[None].repeat(2, 1)
    merged = restore_order(torch.cat([row[:, p] for p in parts], dim=1), lengths, cp, dim=1)
    assert torch.equal(merged, row)
    with pytest.raises(ValueError, match="cannot be cut into 2 \\* 2 equal chunks"):
        chunk_index(6, 2, 0)


class _Group:
    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_rotary_embeddings_of_a_cp_rank_are_its_global_positions() -> None:
    emb = torch.arange(16.0)[:, None, None, None].expand(16, 1, 1, 4)
    picked = [rope_on_this_rank(emb, 0, _Group(2, r))[:, 0, 0, 0].tolist() for r in range(2)]
    assert picked == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]


def run(ckpt, samples, *, ranks=1, cp=1, tp=1, pp=1, algo=KL, packed=False, ref=None):
    """compute_logprobs, then two SGD steps on the samples; (log-probs, per-step metrics, weights)."""

    longest = max(len(x.prompt_array) + x.response_len for x in samples)
    perf = PerfConfig(
        context_parallel_size=cp,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        micro_batch_size=3,
        use_dynamic_batch_size=packed,
        max_tokens_per_gpu=2 * longest + 5 if packed else None,
    )
    g = LearnerGroup(ranks, learner_spec(ckpt, perf=perf, algo=algo, ref=ref))
    # Megatron's order: TP ranks consecutive, then CP, then data parallelism.
    return probe(g, samples, "cp_rank", [r // tp % cp for r in range(ranks)])


@pytest.fixture(scope="module")
def samples(tiny_ckpt):
    return rollout(tiny_ckpt)


@pytest.fixture(scope="module")
def ref_ckpt(tmp_path_factory):
    from tests.helpers import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ref") / "qwen2", seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_two_cp_ranks_match_one(ray_local, tiny_ckpt, ref_ckpt, samples, packed) -> None:
    reference = run(tiny_ckpt, samples, packed=packed, ref=ref_ckpt)
    assert reference[1][0]["kl_loss"] > 0
    assert_same(run(tiny_ckpt, samples, ranks=2, cp=2, packed=packed, ref=ref_ckpt), reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp, pp, packed",
    [(1, 1, True), (2, 1, False), (1, 2, True)],
    ids=["data-parallel-2", "tensor-parallel-2", "pipeline-2"],
)
def test_cp_times_other_parallelism(ray_local, tiny_ckpt, ref_ckpt, samples, tp, pp, packed) -> None:
    """Four ranks: CP = 2 with two data-parallel replicas (packed), CP = 2 x TP = 2 (padded) and CP = 2
    x PP = 2 (packed)."""
    reference = run(tiny_ckpt, samples, packed=packed, ref=ref_ckpt)
    result = run(tiny_ckpt, samples, ranks=4, cp=2, tp=tp, pp=pp, packed=packed, ref=ref_ckpt)
    assert_same(result, reference)


@pytest.mark.slow
def test_ppo_critic_with_two_cp_ranks(ray_local, tiny_ckpt, samples) -> None:
    reference = run(tiny_ckpt, samples, algo=PPO, packed=True)
    assert reference[1][0]["value_loss"] > 0 and reference[1][0]["critic_grad_norm"] > 0
    assert_same(run(tiny_ckpt, samples, ranks=2, cp=2, algo=PPO, packed=True), reference)


def test_unsupported_cp_combinations_are_config_errors(tmp_path) -> None:
    PerfConfig(context_parallel_size=2).check()
    PerfConfig(context_parallel_size=2, use_dynamic_batch_size=True, max_tokens_per_gpu=64).check()
    with pytest.raises(ConfigError, match="context_parallel_size: must be > 0"):
        PerfConfig(context_parallel_size=0).check()
    with pytest.raises(ConfigError, match=r"context_parallel_size.*'sdpa' attention backend"):
        PerfConfig(context_parallel_size=2, attention_backend="local").check()
    PerfConfig(context_parallel_size=2, tensor_model_parallel_size=2, pipeline_model_parallel_size=2).check()
    with pytest.raises(
        ConfigError, match=r"context_parallel_size: > 1 .* with expert_model_parallel_size > 1"
    ):
        PerfConfig(context_parallel_size=2, expert_model_parallel_size=2).check()
    path = parallel_run_toml(tmp_path / "run.toml", {"context_parallel_size": 2}, 3)
    with pytest.raises(
        ConfigError, match=r"learner_ranks=3 is not divisible .* x perf.context_parallel_size=2"
    ):
        load_config(path)
