"""Qwen3-MoE through the HF <-> Megatron bridge: conversion, forward and training against transformers.

Conversion is checked shard by shard (no processes), forwards in this process (a one-rank gloo group) and
through LearnerGroup (Ray actors on gloo), where two expert-parallel ranks must match one rank.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.errors import ConfigError
from engine.hf_config import load_hf_config
from engine.learner import hf_bridge, hf_moe
from engine.learner.config import (
    PerfConfig,
)
from engine.learner.group import LearnerGroup
from engine.learner.weights import load_hf_state
from engine.rollout.hf_engine import HFEngine
from tests.helpers import learner_spec, make_checkpoint
from tests.test_learner import rollout


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("moe") / "qwen3_moe", "qwen3_moe", tied=False, seed=3)


def test_conversion_round_trip_is_identity_for_any_tp_and_ep(moe_ckpt) -> None:
    state, config = load_hf_state(str(moe_ckpt)), load_hf_config(str(moe_ckpt))
    assert any(".mlp.experts.3.down_proj." in n for n in state)  # the checkpoint names each expert
    for tp in (1, 2):
        for ep in (1, 2):
            shape = hf_bridge.shape_of(config, tp=tp, ep=ep)
            by_rank = [hf_bridge.param_maps(shape, r) for r in range(ep)]
            back: dict[str, torch.Tensor] = {}
            for k, p in enumerate(by_rank[0]):
                for r, maps in enumerate(by_rank):
                    q = maps[k]
                    assert q.megatron == p.megatron and hf_moe.on_ep_rank(p, shape.moe, r) == q
                    shards = [
                        hf_bridge.to_megatron(q, [state[n] for n in q.hf], shape, t, tp) for t in range(tp)
                    ]
                    for name, tensor in zip(q.hf, hf_bridge.to_hf(q, shards, shape), strict=True):
                        back[name] = tensor
            assert back.keys() == state.keys(), (tp, ep)
            for name, tensor in state.items():
                assert torch.equal(back[name], tensor), (tp, ep, name)
            # EP rank r holds experts r * n .. r * n + n - 1 under the local names 0 .. n - 1
            n = 4 // ep
            fc2 = {p.megatron: p.hf[0] for p in by_rank[-1] if p.expert and "linear_fc2" in p.megatron}
            assert fc2 == {
                f"decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc2.weight": (
                    f"model.layers.{i}.mlp.experts.{(ep - 1) * n + j}.down_proj.weight"
                )
                for i in range(2)
                for j in range(n)
            }


def test_unsupported_moe_configs_are_clear_errors(moe_ckpt) -> None:
    config = load_hf_config(str(moe_ckpt))
    cases = [
        ({"decoder_sparse_step": 2}, "mixed dense/MoE layers"),
        ({"mlp_only_layers": [1]}, "mixed dense/MoE layers"),
        ({"num_experts_per_tok": 1}, "num_experts_per_tok = 1 with norm_topk_prob"),
        ({"architectures": ["Qwen2MoeForCausalLM"]}, "supported: .*Qwen3ForCausalLM, Qwen3MoeForCausalLM"),
    ]
    for fields, message in cases:
        changed = load_hf_config(str(moe_ckpt), {k: v for k, v in fields.items() if k != "architectures"})
        changed.architectures = fields.get("architectures", changed.architectures)
        with pytest.raises(ConfigError, match=message):
            hf_bridge.shape_of(changed)
    with pytest.raises(ConfigError, match=r"\[perf\] expert_model_parallel_size.*divisible"):
        hf_bridge.shape_of(config, ep=3)
    shape = hf_bridge.shape_of(config, tp=2)  # converts, but Megatron would not train it
    with pytest.raises(ConfigError, match=r"\[perf\] tensor_model_parallel_size.*sequence parallelism"):
        hf_bridge.transformer_config(config, shape, tp=2, params_dtype=torch.float32)
    with pytest.raises(ConfigError, match="expert_model_parallel_size"):
        PerfConfig(expert_model_parallel_size=2, use_dynamic_batch_size=True, max_tokens_per_gpu=64).check()


@pytest.fixture(scope="module")
def parallel(tmp_path_factory):
    from engine.learner.parallel import init_parallel

    init_parallel(0, 1, 1, f"file://{tmp_path_factory.mktemp('dist') / 'store'}", seed=0)


@pytest.mark.parametrize("norm_topk", [True, False])
@torch.no_grad()
def test_megatron_forward_matches_transformers(parallel, tmp_path, norm_topk) -> None:
    """Routing renormalised or not (Megatron's softmax over the top-k logits, or over all experts first)."""
    path = make_checkpoint(tmp_path / "moe", "qwen3_moe", tied=True, seed=11, norm_topk_prob=norm_topk)
    config = load_hf_config(str(path))
    shape = hf_bridge.shape_of(config)
    tconfig = hf_bridge.transformer_config(config, shape, tp=1, params_dtype=torch.float32)
    model = hf_bridge.build_gpt_model(config, shape, tconfig).eval()
    hf_bridge.load_hf_weights(model, load_hf_state(str(path)), shape, 0, 1)
    tokens = torch.randint(1, config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    s = tokens.shape[1]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    ours = model(tokens, torch.arange(s).expand_as(tokens), attention_mask=mask)[..., : config.vocab_size]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.testing.assert_close(ours, hf(input_ids=tokens).logits, atol=1e-4, rtol=1e-4)


def moe_group(ckpt, *, ranks: int = 1, ep: int = 1) -> LearnerGroup:
    spec = learner_spec(ckpt, perf=PerfConfig(expert_model_parallel_size=ep, micro_batch_size=2))
    return LearnerGroup(ranks, spec)


def train_once(ckpt, samples, **kw):
    """Weights exported before, log-probs, one optimizer step's metrics, weights exported after, and the
    parameter count of rank 0."""
    import ray

    g = moe_group(ckpt, **kw)
    try:
        params = ray.get(g.workers[0].num_params.remote())
        before = ray.get(g.export_weights())
        logprobs = g.compute_logprobs(samples)
        metrics = g.train(samples, 1)[0]
        after = ray.get(g.export_weights())
    finally:
        g.shutdown()
    return before, logprobs, metrics, after, params


@pytest.fixture(scope="module")
def moe_samples(moe_ckpt):
    return rollout(moe_ckpt, groups=2, n=4)


@pytest.fixture(scope="module")
def reference(ray_local, moe_ckpt, moe_samples):
    return train_once(moe_ckpt, moe_samples)


def test_learner_matches_engine_exports_exactly_and_trains(moe_ckpt, moe_samples, reference) -> None:
    before, logprobs, metrics, after, _ = reference
    diffs = np.concatenate([lp - x.logprob_array for lp, x in zip(logprobs, moe_samples, strict=True)])
    assert len(diffs) > 20 and np.abs(diffs).max() < 1e-4
    state = load_hf_state(str(moe_ckpt))
    assert before.keys() == state.keys()
    assert all(torch.equal(before[n], t) for n, t in state.items())
    assert all(np.isfinite(v) for v in metrics.values()) and metrics["grad_norm"] > 0
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert "model.layers.0.mlp.gate.weight" in moved
    assert sum(".mlp.experts." in n for n in moved) >= 3 * 4  # most experts of both layers were routed to
    engine = HFEngine(str(moe_ckpt))
    engine.load_weights(after, version=1)  # per-expert names into transformers' fused expert tensors
    fused = engine.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    up = after["model.layers.1.mlp.experts.2.up_proj.weight"]
    assert torch.equal(fused[2, up.shape[0] :], up)


def test_expert_parallel_learner_matches_one_rank(moe_ckpt, moe_samples, reference) -> None:
    """EP = 2 over two gloo ranks (each holds two of the four experts; data parallel over the rest)."""
    ref_before, ref_logprobs, ref_metrics, ref_after, ref_params = reference
    before, logprobs, metrics, after, params = train_once(moe_ckpt, moe_samples, ranks=2, ep=2)
    expert = sum(t.numel() for n, t in ref_before.items() if ".mlp.experts." in n)
    assert params == ref_params - expert // 2  # rank 0 holds half of the experts
    assert before.keys() == ref_before.keys()
    assert all(torch.equal(before[n], t) for n, t in ref_before.items())
    for a, b in zip(logprobs, ref_logprobs, strict=True):
        assert np.allclose(a, b, atol=1e-5)
    for key in ("loss", "pg_loss", "grad_norm", "entropy"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-6), key
    for name, tensor in ref_after.items():
        assert torch.allclose(after[name], tensor, atol=1e-5), name
