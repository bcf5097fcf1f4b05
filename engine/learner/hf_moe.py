"""HF <-> Megatron-core for mixture-of-experts MLPs (Qwen3-MoE): shape, config fields and weight maps.

Guarantees:
- `moe_shape_of` accepts exactly the HF MoE configs whose forward Megatron's MoELayer reproduces: every
  decoder layer sparse, softmax router without bias or shared experts, top-k >= 2 when the top-k
  weights are renormalised, experts divisible by the expert-parallel size; anything else is a
  ConfigError naming the field;
- `config_fields` routes like the HF router: softmax over all experts then top-k (norm_topk_prob false),
  or softmax over the top-k logits, which equals the renormalised top-k probabilities (true); no
  auxiliary loss and no token dropping, so every token reaches its k experts;
- `mlp_maps` gives expert-parallel rank r the experts r * n_local .. (r + 1) * n_local - 1 under
  Megatron's local names 0 .. n_local - 1 (SequentialMLP), each split over tensor-parallel ranks like the
  dense MLP (gate/up fused per rank, down row-split); `on_ep_rank` renames a map to another EP rank's
  experts, which is all that gathering over EP ranks needs. HF names are those of HF checkpoints
  (`mlp.experts.{e}.gate_proj.weight`); `to_transformers_layout` turns them into the fused 3-D
  parameters a transformers 5 model holds in memory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.learner.hf_bridge import ParamMap

_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


@dataclass(frozen=True)
class MoEShape:
    """The MoE numbers conversion and the Megatron config need."""

    experts: int
    topk: int
    ffn: int  # each expert's intermediate size
    norm_topk: bool  # renormalise the top-k routing weights to sum to 1
    ep: int = 1  # expert-parallel size

    @property
    def local(self) -> int:
        """Experts held by one expert-parallel rank."""
        return self.experts // self.ep


def _error(message: str, key: str = "hf_checkpoint", section: str = "ckpt") -> ConfigError:
    return ConfigError(message, section=section, key=key)


def moe_shape_of(hf_config: Any, *, tp: int = 1, ep: int = 1) -> MoEShape:
    """The MoE shape of a Qwen3-MoE config, or a ConfigError for what Megatron's MoELayer cannot match."""
    c = hf_config
    experts, topk = int(c.num_experts or 0), int(c.num_experts_per_tok)
    if experts < 1:
        raise _error(f"num_experts = {experts}: a MoE architecture needs experts")
    step, dense = (
        int(getattr(c, "decoder_sparse_step", 1) or 1),
        list(getattr(c, "mlp_only_layers", []) or []),
    )
    if step != 1 or dense:
        raise _error(
            f"mixed dense/MoE layers (decoder_sparse_step = {step}, mlp_only_layers = {dense}) are not "
            "supported: every decoder layer must be a MoE layer (decoder_sparse_step = 1, no mlp_only_layers)"
        )
    if getattr(c, "shared_expert_intermediate_size", 0) or getattr(c, "n_shared_experts", 0):
        raise _error("shared experts are not supported")
    if not 1 <= topk <= experts:
        raise _error(f"num_experts_per_tok = {topk} must be between 1 and num_experts = {experts}")
    norm_topk = bool(getattr(c, "norm_topk_prob", False))
    if topk == 1 and norm_topk:
        # The renormalised top-1 weight is always 1; Megatron's softmax over one logit has no gradient.
        raise _error("num_experts_per_tok = 1 with norm_topk_prob = true is not supported")
    if ep < 1 or experts % ep:
        raise _error(
            f"num_experts ({experts}) must be divisible by expert_model_parallel_size={ep}",
            key="expert_model_parallel_size",
            section="perf",
        )
    ffn = int(c.moe_intermediate_size)
    if ffn % tp:
        raise _error(
            f"moe_intermediate_size ({ffn}) must be divisible by tensor_model_parallel_size={tp}",
            key="tensor_model_parallel_size",
            section="perf",
        )
    return MoEShape(experts=experts, topk=topk, ffn=ffn, norm_topk=norm_topk, ep=ep)


def check_trainable(m: MoEShape | None, *, tp: int) -> None:
    """Raise a ConfigError where the learner could not train these MoE layers (the conversion could)."""
    if m is not None and tp > 1:
        # Megatron's MoELayer refuses to train under tensor parallelism without sequence parallelism.
        raise _error(
            "MoE models need tensor_model_parallel_size = 1 in this build (Megatron trains MoE layers "
            "under tensor parallelism only with sequence parallelism, which needs Transformer Engine)",
            key="tensor_model_parallel_size",
            section="perf",
        )


def config_fields(m: MoEShape, *, tp: int) -> dict[str, Any]:
    """TransformerConfig keyword arguments of the MoE layers (routing as the HF router, no aux loss)."""
    check_trainable(m, tp=tp)
    return {
        "num_moe_experts": m.experts,
        "moe_router_topk": m.topk,
        "moe_ffn_hidden_size": m.ffn,
        "moe_router_score_function": "softmax",
        # pre-softmax: softmax over all experts, then top-k (HF without renormalisation); otherwise the
        # softmax over the top-k logits, i.e. the top-k probabilities renormalised.
        "moe_router_pre_softmax": not m.norm_topk,
        "moe_router_dtype": "fp32",
        # RL fine-tuning: no load-balancing loss (it would change the policy objective), no token dropping.
        "moe_router_load_balancing_type": "none",
        "moe_aux_loss_coeff": 0.0,
        "moe_token_dispatcher_type": "allgather",
        "moe_grouped_gemm": False,
        "expert_model_parallel_size": m.ep,
    }


def patch_megatron() -> None:
    """Let Megatron-core 0.16.1's router run without Transformer Engine.

    Its router gating tests `te_general_gemm is not None`, a name moe_utils defines only when Transformer
    Engine imports; without it every MoE forward is a NameError. Defined as None, the torch path runs.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def mlp_maps(m_prefix: str, hf_prefix: str, m: MoEShape, ep_rank: int) -> list[ParamMap]:
    """One decoder layer's MoE parameters on EP rank ep_rank (prefixes end with the layer's dot)."""
    from engine.learner.hf_bridge import ParamMap

    maps = [ParamMap(f"{m_prefix}mlp.router.weight", (f"{hf_prefix}mlp.gate.weight",), "rep")]
    for j in range(m.local):
        local, hf = (
            f"{m_prefix}mlp.experts.local_experts.{j}.",
            f"{hf_prefix}mlp.experts.{ep_rank * m.local + j}.",
        )
        maps += [
            ParamMap(
                f"{local}linear_fc1.weight",
                (f"{hf}gate_proj.weight", f"{hf}up_proj.weight"),
                "gate_up",
                expert=True,
            ),
            ParamMap(f"{local}linear_fc2.weight", (f"{hf}down_proj.weight",), "row", expert=True),
        ]
    return maps


def on_ep_rank(p: ParamMap, m: MoEShape, ep_rank: int) -> ParamMap:
    """The same Megatron parameter (an expert's) as held by EP rank ep_rank: its HF names renumbered."""
    if not p.expert:
        return p
    renamed = tuple(
        _EXPERT.sub(lambda g: f".mlp.experts.{ep_rank * m.local + int(g.group(1)) % m.local}.", n)
        for n in p.hf
    )
    return replace(p, hf=renamed)


def over_ep_ranks(
    p: ParamMap, shards: list[torch.Tensor], m: MoEShape | None, ep_group: Any
) -> list[tuple[ParamMap, list[torch.Tensor]]]:
    """(map, TP shards) of parameter p as every EP rank holds it: an expert's are gathered over the EP
    group (a collective: every EP rank calls it), any other parameter is its own, once."""
    if not p.expert or m is None or m.ep == 1:
        return [(p, shards)]
    import torch.distributed as dist

    stacked = torch.stack(shards)
    gathered = [torch.empty_like(stacked) for _ in range(m.ep)]
    dist.all_gather(gathered, stacked, group=ep_group)
    return [(on_ep_rank(p, m, r), list(g.unbind(0))) for r, g in enumerate(gathered)]


def to_transformers_layout(
    named: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors in the layout of `params` (a transformers model's named parameters).

    transformers 5 holds a layer's experts as `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first)
    and `mlp.experts.down_proj` [E, H, I]; checkpoints (and this bridge) name each expert's
    gate_proj / up_proj / down_proj. Names the model holds as they are pass through unchanged."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, tensor in named.items():
        match = (
            None if name in params else re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)_proj\.weight", name)
        )
        if match is None:
            out[name] = tensor
            continue
        prefix, e, proj = match.group(1), int(match.group(2)), match.group(3)
        experts.setdefault(prefix, {}).setdefault(e, {})[proj] = tensor
    for prefix, by_expert in experts.items():
        order = [by_expert[e] for e in sorted(by_expert)]
        complete = all(set(d) == {"gate", "up", "down"} for d in order)
        if (
            not complete
            or f"{prefix}.gate_up_proj" not in params
            or sorted(by_expert) != list(range(len(order)))
        ):
            out.update(
                {f"{prefix}.{e}.{k}_proj.weight": v for e, d in by_expert.items() for k, v in d.items()}
            )
            continue
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([d["gate"], d["up"]]) for d in order])
        out[f"{prefix}.down_proj"] = torch.stack([d["down"] for d in order])
    return out
