"""HF <-> Megatron-core for decoder families (Qwen2, Llama, Qwen3, Qwen3-MoE): config, model and weights.

Guarantees: `to_megatron` gives tensor-parallel rank r exactly the shard Megatron's parallel layers hold
on that rank (fused QKV in query-group order, gate/up fused per rank, vocabulary zero-padded and split),
and `to_hf` inverts it from the shards of all ranks, so HF -> Megatron -> HF is the identity. MoE layers
(engine/learner/hf_moe.py) map each expert like a dense MLP, and `param_maps(s, ep_rank)` names the
experts expert-parallel rank ep_rank holds. An architecture outside the table is a ConfigError listing
the supported ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from engine.errors import ConfigError
from engine.learner import hf_moe

if TYPE_CHECKING:
    from engine.learner.hf_moe import MoEShape


@dataclass(frozen=True)
class Family:
    """What distinguishes one dense decoder family from another, for conversion."""

    qkv_bias_default: bool
    qk_norm: bool
    moe: bool = False  # mixture-of-experts MLPs (engine/learner/hf_moe.py)


FAMILIES: dict[str, Family] = {
    "Qwen2ForCausalLM": Family(qkv_bias_default=True, qk_norm=False),
    "LlamaForCausalLM": Family(qkv_bias_default=False, qk_norm=False),
    "Qwen3ForCausalLM": Family(qkv_bias_default=False, qk_norm=True),
    "Qwen3MoeForCausalLM": Family(qkv_bias_default=False, qk_norm=True, moe=True),
}


@dataclass(frozen=True)
class Shape:
    """The numbers conversion needs, read once from an HF config."""

    layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int
    padded_vocab: int
    qkv_bias: bool
    qk_norm: bool
    tied: bool
    moe: MoEShape | None = None  # None: dense MLPs


def family_of(hf_config: Any) -> Family:
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    raise ConfigError(
        f"unsupported architecture {archs or hf_config.model_type!r}; supported: {', '.join(FAMILIES)}",
        section="ckpt",
        key="hf_checkpoint",
    )


def shape_of(hf_config: Any, tp: int = 1, divisible_by: int = 128, ep: int = 1) -> Shape:
    family = family_of(hf_config)
    c = hf_config
    heads, groups = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    if heads % tp or groups % tp:
        raise ConfigError(
            f"attention heads ({heads}) and KV heads ({groups}) must both be divisible by "
            f"tensor_model_parallel_size={tp}",
            section="perf",
            key="tensor_model_parallel_size",
        )
    scaling = rope_parameters(c)
    if scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ConfigError(f"rope scaling {scaling} is not supported", section="ckpt", key="hf_checkpoint")
    for flag in ("mlp_bias", "attention_bias"):
        if getattr(c, flag, False) and not (flag == "attention_bias" and family.qkv_bias_default):
            raise ConfigError(f"{flag} = true is not supported", section="ckpt", key="hf_checkpoint")
    multiple = divisible_by * tp
    return Shape(
        layers=c.num_hidden_layers,
        hidden=c.hidden_size,
        heads=heads,
        groups=groups,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
        ffn=c.intermediate_size,
        vocab=c.vocab_size,
        padded_vocab=-(-c.vocab_size // multiple) * multiple,
        qkv_bias=family.qkv_bias_default,
        qk_norm=family.qk_norm,
        tied=bool(getattr(c, "tie_word_embeddings", False)),
        moe=hf_moe.moe_shape_of(c, tp=tp, ep=ep) if family.moe else None,
    )


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """RoPE settings: transformers 5 keeps them in `rope_parameters` (older configs: top-level fields)."""
    params = dict(
        getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    )
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return params


def transformer_config(
    hf_config: Any,
    s: Shape,
    *,
    tp: int,
    params_dtype: torch.dtype,
    pp: int = 1,
    cp: int = 1,
    **recompute: Any,
):
    """Megatron TransformerConfig for the local (non-Transformer-Engine) layer spec; pp pipeline stages;
    cp context-parallel ranks (engine/learner/context_parallel.py);
    recompute: Megatron's recompute_granularity / recompute_method / recompute_num_layers."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    on_cpu = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=s.layers,
        hidden_size=s.hidden,
        num_attention_heads=s.heads,
        num_query_groups=s.groups,
        kv_channels=s.head_dim,
        ffn_hidden_size=s.ffn,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=s.qkv_bias,
        qk_layernorm=s.qk_norm,
        # No dropout: the learner's recomputed log-probs must be those of the training forward.
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=tp,
        # Pipeline stages pass hidden states of the parameters' dtype (engine/learner/pipeline.py).
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        attention_softmax_in_fp32=True,
        use_cpu_initialization=on_cpu,
        perform_initialization=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        **(hf_moe.config_fields(s.moe, tp=tp) if s.moe else {}),
        **recompute,
    )


ATTENTION_BACKENDS = ("sdpa", "local")


def build_gpt_model(
    hf_config: Any, s: Shape, tconfig: Any, attention: str = "sdpa", *, pp_rank: int = 0, pp: int = 1
) -> torch.nn.Module:
    """A Megatron GPTModel of the HF architecture, returning full-vocabulary logits on every TP rank.

    pp > 1: the part of pipeline stage pp_rank (`stage_param_maps`), returning hidden states except on
    the last stage. With tied embeddings the last stage's copy of the word embeddings stays as built
    (zeros): Megatron would copy it from the first stage with a CUDA-only all-reduce, and the weights
    loaded next fill both copies.

    attention: "sdpa" (engine/learner/attention.py: torch's fused kernels, packed sequences) or "local"
    (Megatron's DotProductAttention: an explicit [b, heads, s, s] softmax, no packed sequences).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from engine.learner.attention import sdpa_layer_spec

    experts = s.moe.experts if s.moe else None
    if s.moe:
        hf_moe.patch_megatron()
    if attention == "sdpa":
        spec = sdpa_layer_spec(s.qk_norm, num_experts=experts)
    elif attention == "local":
        spec = get_gpt_layer_local_spec(
            num_experts=experts, moe_grouped_gemm=False, normalization="RMSNorm", qk_layernorm=s.qk_norm
        )
    else:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    pg_collection = None
    if pp > 1:
        from megatron.core.process_groups_config import ProcessGroupCollection

        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        pg_collection.embd = None
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=spec,
        vocab_size=s.padded_vocab,
        max_sequence_length=hf_config.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=float(rope_parameters(hf_config)["rope_theta"]),
        rotary_percent=1.0,
        share_embeddings_and_output_weights=s.tied,
        parallel_output=False,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
        pg_collection=pg_collection,
    )
    mark_tensor_parallel(model, s, pp_rank=pp_rank, pp=pp)
    return model


def mark_tensor_parallel(model: torch.nn.Module, s: Shape, *, pp_rank: int = 0, pp: int = 1) -> None:
    """Tag every parameter with Megatron's tensor-parallel attributes.

    Megatron sets them only while initialising weights; with perform_initialization=False (the weights
    come from a checkpoint) they would be missing, and code that must count each TP shard once (the
    gradient norm) would count split parameters as duplicates. Expert parameters also get Megatron's
    `allreduce = False`: their gradients are summed over the expert-data-parallel group only.
    """
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    params = dict(model.named_parameters())
    for p in stage_param_maps(s, pp_rank, pp):
        param = params[p.megatron]
        if not hasattr(param, "tensor_model_parallel"):
            split = p.kind != "rep"
            set_tensor_model_parallel_attributes(
                param, split, 1 if p.kind == "row" else 0 if split else -1, 1
            )
        if p.expert:
            param.allreduce = False


@dataclass(frozen=True)
class ParamMap:
    """One Megatron parameter, the HF tensors it is made of, and how it is split across TP ranks."""

    megatron: str
    hf: tuple[str, ...]
    kind: str  # "qkv" | "gate_up" | "col" | "row" | "rep" | "vocab"
    # Replicated, but applied to this rank's heads only: its TP ranks' gradients must be summed.
    tp_partial_grad: bool = False
    # One of this expert-parallel rank's experts (other EP ranks hold others: hf_moe.on_ep_rank).
    expert: bool = False


def param_maps(s: Shape, ep_rank: int = 0) -> list[ParamMap]:
    """Every Megatron parameter of the model, with the experts of expert-parallel rank ep_rank."""
    maps = [ParamMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for i in range(s.layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = f"{h}self_attn."
        maps += [
            ParamMap(f"{m}input_layernorm.weight", (f"{h}input_layernorm.weight",), "rep"),
            ParamMap(
                f"{m}self_attention.linear_qkv.weight",
                (f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight"),
                "qkv",
            ),
            ParamMap(f"{m}self_attention.linear_proj.weight", (f"{attn}o_proj.weight",), "row"),
            ParamMap(f"{m}pre_mlp_layernorm.weight", (f"{h}post_attention_layernorm.weight",), "rep"),
        ]
        if s.moe:
            maps += hf_moe.mlp_maps(m, h, s.moe, ep_rank)
        else:
            maps += [
                ParamMap(
                    f"{m}mlp.linear_fc1.weight",
                    (f"{h}mlp.gate_proj.weight", f"{h}mlp.up_proj.weight"),
                    "gate_up",
                ),
                ParamMap(f"{m}mlp.linear_fc2.weight", (f"{h}mlp.down_proj.weight",), "row"),
            ]
        if s.qkv_bias:
            maps.append(
                ParamMap(
                    f"{m}self_attention.linear_qkv.bias",
                    (f"{attn}q_proj.bias", f"{attn}k_proj.bias", f"{attn}v_proj.bias"),
                    "qkv",
                )
            )
        if s.qk_norm:
            maps += [
                ParamMap(f"{m}self_attention.q_layernorm.weight", (f"{attn}q_norm.weight",), "rep", True),
                ParamMap(f"{m}self_attention.k_layernorm.weight", (f"{attn}k_norm.weight",), "rep", True),
            ]
    maps.append(ParamMap("decoder.final_layernorm.weight", ("model.norm.weight",), "rep"))
    if not s.tied:
        maps.append(ParamMap("output_layer.weight", ("lm_head.weight",), "vocab"))
    return maps


def layers_per_stage(s: Shape, pp: int) -> int:
    """The decoder layers of each of pp pipeline stages (Megatron's even split)."""
    if s.layers % pp:
        raise ConfigError(
            f"the model's {s.layers} layers cannot be split evenly over pipeline_model_parallel_size={pp} "
            "stages; choose a divisor of the layer count",
            section="perf",
            key="pipeline_model_parallel_size",
        )
    return s.layers // pp


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def stage_param_maps(
    s: Shape, pp_rank: int = 0, pp: int = 1, ep_rank: int = 0, *, tied_copy: bool = True
) -> list[ParamMap]:
    """`param_maps` of pipeline stage pp_rank of pp, named as that stage's GPTModel names them.

    Stage r holds layers r*n .. r*n + n - 1 (n = layers / pp), named decoder.layers.0 .. n-1 there; the
    embedding is on the first stage, the final norm and output layer on the last. With tied embeddings
    and pp > 1 the last stage holds its own copy of the word embeddings as output_layer.weight, made of
    the same HF tensor; tied_copy=False leaves it out (to export each HF tensor once).
    """
    if pp == 1:
        return param_maps(s, ep_rank)
    n = layers_per_stage(s, pp)
    first, last = pp_rank == 0, pp_rank == pp - 1
    maps = []
    for p in param_maps(s, ep_rank):
        layer = _LAYER.match(p.megatron)
        if layer is not None:
            local = int(layer.group(1)) - pp_rank * n
            if 0 <= local < n:
                maps.append(replace(p, megatron=f"decoder.layers.{local}.{p.megatron[layer.end() :]}"))
        elif p.megatron.startswith("embedding."):
            if first:
                maps.append(p)
        elif last:
            maps.append(p)
    if last and s.tied and tied_copy:
        embedding = next(
            p for p in param_maps(s, ep_rank) if p.megatron == "embedding.word_embeddings.weight"
        )
        maps.append(replace(embedding, megatron="output_layer.weight"))
    return maps


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Shape) -> torch.Tensor:
    per = s.heads // s.groups * s.head_dim
    rest = q.shape[1:]
    q, k, v = (
        q.reshape(s.groups, per, *rest),
        k.reshape(s.groups, s.head_dim, *rest),
        v.reshape(s.groups, s.head_dim, *rest),
    )
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _split_qkv(fused: torch.Tensor, s: Shape) -> tuple[torch.Tensor, ...]:
    per = s.heads // s.groups * s.head_dim
    rest = fused.shape[1:]
    grouped = fused.reshape(s.groups, per + 2 * s.head_dim, *rest)
    q, k, v = grouped.split([per, s.head_dim, s.head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def to_megatron(p: ParamMap, hf: list[torch.Tensor], s: Shape, tp_rank: int, tp: int) -> torch.Tensor:
    """The TP-rank shard of one Megatron parameter, from its HF tensors."""
    if p.kind == "rep":
        return hf[0]
    if p.kind == "row":
        return hf[0].chunk(tp, dim=1)[tp_rank]
    if p.kind == "col":
        return hf[0].chunk(tp, dim=0)[tp_rank]
    if p.kind == "vocab":
        full = hf[0].new_zeros(s.padded_vocab, *hf[0].shape[1:])
        full[: s.vocab] = hf[0]
        return full.chunk(tp, dim=0)[tp_rank]
    if p.kind == "qkv":
        return _fuse_qkv(*hf, s).chunk(tp, dim=0)[tp_rank]
    if p.kind == "gate_up":
        gate, up = hf
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    raise ValueError(p.kind)


def to_hf(p: ParamMap, shards: list[torch.Tensor], s: Shape) -> list[torch.Tensor]:
    """The HF tensors of one Megatron parameter, from its shards on TP ranks 0..tp-1."""
    if p.kind == "rep":
        return [shards[0]]
    if p.kind == "row":
        return [torch.cat(shards, dim=1)]
    if p.kind == "col":
        return [torch.cat(shards, dim=0)]
    if p.kind == "vocab":
        return [torch.cat(shards, dim=0)[: s.vocab]]
    if p.kind == "qkv":
        return list(_split_qkv(torch.cat(shards, dim=0), s))
    if p.kind == "gate_up":
        halves = [x.chunk(2, dim=0) for x in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]
    raise ValueError(p.kind)


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module,
    hf_state: dict[str, torch.Tensor],
    s: Shape,
    tp_rank: int,
    tp: int,
    ep_rank: int = 0,
    *,
    pp_rank: int = 0,
    pp: int = 1,
) -> None:
    """Copy an HF state dict into a Megatron model's shard (of pipeline stage pp_rank of pp); every
    parameter must be covered exactly."""
    params = dict(model.named_parameters())
    maps = stage_param_maps(s, pp_rank, pp, ep_rank)
    expected = {p.megatron for p in maps}
    if set(params) != expected:
        raise RuntimeError(
            f"Megatron parameters differ from the conversion table: {sorted(set(params) ^ expected)[:6]}"
        )
    missing = [n for p in maps for n in p.hf if n not in hf_state]
    if missing:
        raise RuntimeError(f"HF checkpoint lacks {missing[:6]}")
    for p in maps:
        shard = to_megatron(p, [hf_state[n] for n in p.hf], s, tp_rank, tp)
        target = params[p.megatron]
        if shard.shape != target.shape:
            raise RuntimeError(
                f"{p.megatron}: converted shape {tuple(shard.shape)}, model has {tuple(target.shape)}"
            )
        target.copy_(shard)
