"""Tiny checkpoints and samples for tests, made on the spot (no download, a fraction of a second)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from engine.tasks.char_tokenizer import build_char_tokenizer
from engine.wire import Sample

FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}


def make_checkpoint(
    path: Path,
    family: str = "qwen2",
    *,
    tied: bool = True,
    seed: int = 0,
    rope_theta: float = 10000.0,
    **config: object,
) -> Path:
    """A random tiny HF checkpoint of `family` with the built-in character tokenizer (config: HF config
    fields replacing the defaults)."""
    import transformers

    config_cls, model_cls = (getattr(transformers, n) for n in FAMILIES[family])
    kwargs = dict(
        vocab_size=110,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        rms_norm_eps=1e-6,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
        rope_theta=rope_theta,
    )
    if family in ("qwen3", "qwen3_moe"):
        kwargs["head_dim"] = 32
    if family == "qwen3_moe":  # 4 experts, 2 per token, renormalised routing weights
        kwargs.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True)
    kwargs.update(config)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    model.config.architectures = [model_cls.__name__]
    path.mkdir(parents=True, exist_ok=True)
    build_char_tokenizer(path)
    model.save_pretrained(path)
    return path


def prompt_ids(tokenizer_path: Path, text: str) -> tuple[int, ...]:
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tuple(tok(rendered, add_special_tokens=False).input_ids)


def sample(
    group_id: int = 0, index: int = 0, group_size: int = 1, n: int = 3, reward: float = 1.0, **kw
) -> Sample:
    fields = dict(
        prompt_ids=[1, 2, 3],
        response_ids=list(range(10, 10 + n)),
        rollout_logprobs=[-0.5] * n,
        versions=[0] * n,
        group_id=group_id,
        index=index,
        group_size=group_size,
        prompt_index=group_id,
        reward=reward,
        status="completed",
    )
    fields.update(kw)
    return Sample.build(**fields)


def learner_spec(ckpt, *, perf=None, algo=None, optimizer=None, ref=None, **extra):
    """A LearnerSpec for tests: 10-step schedule, seed 0, one thread per rank, SGD at 0.05 unless given."""
    from engine.learner.config import (
        AlgoConfig,
        CkptConfig,
        LearnerSpec,
        ModelConfig,
        OptimizerConfig,
        PerfConfig,
    )

    return LearnerSpec(
        model=ModelConfig(),
        ckpt=CkptConfig(hf_checkpoint=str(ckpt), ref_load=None if ref is None else str(ref)),
        perf=perf or PerfConfig(),
        algo=algo or AlgoConfig(),
        optimizer=optimizer or OptimizerConfig(optimizer="sgd", lr=0.05),
        temperature=1.0,
        total_steps=10,
        seed=0,
        threads=1,
        **extra,
    )


def parallel_run_toml(path: Path, perf: dict[str, int], learner_ranks: int) -> Path:
    """A minimal run config at path with these [perf] sizes and cluster.learner_ranks (for the checks that
    tie the parallel layout to the number of learner ranks)."""
    sizes = "".join(f"{key} = {value}\n" for key, value in perf.items())
    path.write_text(
        '[ckpt]\nhf_checkpoint = "some/model"\n'
        '[rollout]\nprompt_data = "p.jsonl"\nbatch_size = 4\nn_samples_per_prompt = 2\nnum_rollout = 1\n'
        f"[perf]\n{sizes}[cluster]\nlearner_ranks = {learner_ranks}\n"
    )
    return path
