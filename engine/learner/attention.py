"""Core attention on torch's scaled_dot_product_attention, for padded (sbhd) and packed (thd) input.

`SDPACoreAttention` stands in for Megatron's DotProductAttention as the `core_attention` of the local
layer spec (`sdpa_layer_spec`). Guarantees:
- it computes causal softmax(q k^T * scale) v with DotProductAttention's scale (config.softmax_scale,
  else kv_channels ** -0.5; query-key layer scaling cancels out in Megatron and is not applied) and
  grouped-query attention, so both give the same outputs up to rounding;
- padded input [s, b, heads, d] is attended with a plain causal mask. Micro-batches are right-padded, so
  a real token attends only to real tokens before it; padding positions attend to whatever precedes
  them, but they never reach the loss (their mask is 0), so no padding mask is needed;
- packed input (packed_seq_params with qkv_format "thd": q/k/v are [t, heads, d], sequence i occupies
  rows cu_seqlens[i]:cu_seqlens[i + 1]) never attends across a sequence boundary. Rotary embeddings
  restart at position 0 for every sequence (Megatron's thd RoPE path, given max_seqlen below the packed
  length), so a packed sequence is computed exactly as it would be alone.
- context parallelism (a CP group of more than one rank; engine/learner/context_parallel.py): each rank
  holds chunks r and 2 * cp - 1 - r of every sequence (padded rows, or each packed sequence, whose
  cu_seqlens are then the whole sequences'); keys and values are all-gathered over the CP group (their
  gradients reduce-scattered back), and each local chunk attends to the keys up to its own end with the
  causal mask in global positions, so every rank's outputs are those of its positions without CP.

Kernels: padded input uses SDPA with is_causal=True (flash or memory-efficient kernels on GPU). Packed
input on CUDA in fp16/bf16 uses torch.nn.attention.varlen.varlen_attn (flash attention over cu_seqlens);
otherwise (CPU, fp32, or a torch without it) a loop of causal SDPA calls, one per sequence, which costs
sum(s_i^2) rather than (sum s_i)^2 and needs no [t, t] mask. With CP each chunk is one SDPA call with
an explicit [c, end] boolean mask.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec

from engine.learner import context_parallel as cp_split

try:
    from torch.nn.attention.varlen import varlen_attn

    _VARLEN_ARGS = set(inspect.signature(varlen_attn).parameters)
except (ImportError, ValueError, TypeError):  # torch without the varlen API: the per-sequence loop serves
    varlen_attn, _VARLEN_ARGS = None, set()


class SDPACoreAttention(MegatronModule):
    """DotProductAttention's interface (constructor and forward), computed by SDPA."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.utils import divide

        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPACoreAttention computes causal attention only, got {attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"SDPACoreAttention runs without attention dropout, got {dropout}")
        if getattr(config, "softmax_type", "vanilla") != "vanilla" or getattr(config, "window_size", None):
            raise ValueError("SDPACoreAttention supports the vanilla softmax without a window only")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp = pg_collection.tp.size()
        self.cp_group = getattr(pg_collection, "cp", None)
        self.cp = self.cp_group.size() if self.cp_group is not None else 1
        if self.cp != config.context_parallel_size:
            raise ValueError(
                f"context_parallel_size {config.context_parallel_size} but a CP group of {self.cp} ranks"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.softmax_scale = config.kv_channels**-0.5 if softmax_scale is None else softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """[s, b, heads, d] -> [s, b, heads * d]; packed: [t, heads, d] -> [t, heads * d].

        attention_mask is not read: the causal mask (per sequence when packed) is built in.
        """
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not support an attention bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            if self.cp > 1:
                return self._packed_cp(query, key, value, packed_seq_params)
            return self._packed(query, key, value, packed_seq_params)
        if packed_seq_params is not None:
            raise ValueError(f"unsupported packed format {packed_seq_params.qkv_format!r}")
        if self.cp > 1:
            return self._padded_cp(query, key, value)
        if query.shape[0] != key.shape[0]:
            raise ValueError("SDPACoreAttention is for self-attention over the whole sequence")
        s, b = query.shape[:2]
        # sbhd -> bhsd
        out = self._sdpa(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3))
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal SDPA over [..., heads, s, d] with grouped key/value heads."""
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=self.groups != self.heads
        )

    def _packed(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: PackedSeqParams
    ) -> torch.Tensor:
        cu = params.cu_seqlens_q
        for other in (params.cu_seqlens_kv, params.cu_seqlens_q_padded, params.cu_seqlens_kv_padded):
            if other is not None and other is not cu and not torch.equal(other, cu):
                raise ValueError("SDPACoreAttention needs equal, unpadded cu_seqlens for q and kv")
        t = query.shape[0]
        if self._use_varlen(query):  # no host synchronisation on this path
            return self._varlen(query, key, value, cu, params.max_seqlen_q).reshape(t, -1)
        lengths = (cu[1:] - cu[:-1]).tolist()
        if sum(lengths) != t:
            raise ValueError(f"cu_seqlens covers {sum(lengths)} tokens but the packed input has {t}")
        parts = []
        # [t, heads, d] -> per sequence [heads, s_i, d]
        for q, k, v in zip(query.split(lengths), key.split(lengths), value.split(lengths), strict=True):
            parts.append(self._sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1))
        return torch.cat(parts).reshape(t, -1)

    # --- context parallelism: local queries against the whole sequence's keys and values ----------------

    def _gather_kv(
        self, key: torch.Tensor, value: torch.Tensor, lengths: list[int]
    ) -> tuple[torch.Tensor, ...]:
        """Keys and values [t_local, ..., groups, d] of every CP rank, in sequence order ([t, ...])."""
        g = key.shape[-2]
        kv = cp_split.gather_kv(torch.cat([key, value], dim=-2), 0, self.cp_group, self.cp)
        kv = cp_split.restore_order(kv, lengths, self.cp, 0)
        return kv[..., :g, :], kv[..., g:, :]

    def _chunks_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One sequence: q [heads, 2c, d] this rank's two chunks, k/v [groups, 2 cp c, d] the whole
        sequence; each chunk attends causally in global positions (keys up to its own end)."""
        rank, c = self.cp_group.rank(), q.shape[-2] // 2
        out = []
        for part, chunk in zip(q.split(c, dim=-2), (rank, 2 * self.cp - 1 - rank), strict=True):
            end = (chunk + 1) * c
            allowed = (
                torch.arange(end, device=q.device)[None, :]
                <= torch.arange(end - c, end, device=q.device)[:, None]
            )
            out.append(
                F.scaled_dot_product_attention(
                    part,
                    k[..., :end, :],
                    v[..., :end, :],
                    attn_mask=allowed,
                    scale=self.softmax_scale,
                    enable_gqa=self.groups != self.heads,
                )
            )
        return torch.cat(out, dim=-2)

    def _padded_cp(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """[s_local, b, heads, d]: this rank's positions of rows of cp * s_local positions."""
        s_local, b = query.shape[:2]
        key, value = self._gather_kv(key, value, [s_local * self.cp])
        out = self._chunks_attend(
            query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3)
        )
        return out.permute(2, 0, 1, 3).reshape(s_local, b, -1)

    def _packed_cp(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: PackedSeqParams
    ) -> torch.Tensor:
        """[t_local, heads, d]: this rank's chunks of each packed sequence (cu_seqlens: the whole
        sequences', each a multiple of 2 * cp long, as Megatron's CP RoPE expects)."""
        cu = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        lengths = (cu[1:] - cu[:-1]).tolist()
        t = query.shape[0]
        if sum(lengths) != t * self.cp:
            raise ValueError(f"cu_seqlens covers {sum(lengths)} tokens, not {self.cp} x the local {t}")
        key, value = self._gather_kv(key, value, lengths)
        local = [n // self.cp for n in lengths]
        parts = []
        for q, k, v in zip(query.split(local), key.split(lengths), value.split(lengths), strict=True):
            parts.append(
                self._chunks_attend(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)).transpose(0, 1)
            )
        return torch.cat(parts).reshape(t, -1)

    def _use_varlen(self, query: torch.Tensor) -> bool:
        """Flash varlen: CUDA, half precision, a causal mode and our scale (torch 2.10 has no `scale`)."""
        default_scale = abs(self.softmax_scale - query.shape[-1] ** -0.5) < 1e-12
        return (
            varlen_attn is not None
            and query.is_cuda
            and query.dtype in (torch.float16, torch.bfloat16)
            and bool(_VARLEN_ARGS & {"window_size", "is_causal"})
            and ("scale" in _VARLEN_ARGS or default_scale)
        )

    def _varlen(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        cu: torch.Tensor,
        longest: int | None,
    ) -> torch.Tensor:
        assert varlen_attn is not None
        kwargs: dict[str, Any] = (
            {"window_size": (-1, 0)} if "window_size" in _VARLEN_ARGS else {"is_causal": True}
        )
        if "scale" in _VARLEN_ARGS:
            kwargs["scale"] = self.softmax_scale
        if self.groups != self.heads:
            if "enable_gqa" in _VARLEN_ARGS:
                kwargs["enable_gqa"] = True
            else:
                key = key.repeat_interleave(self.heads // self.groups, dim=1)
                value = value.repeat_interleave(self.heads // self.groups, dim=1)
        cu32 = cu.to(device=query.device, dtype=torch.int32)
        longest = int(longest or int((cu[1:] - cu[:-1]).max()))
        return varlen_attn(
            query.contiguous(), key.contiguous(), value.contiguous(), cu32, cu32, longest, longest, **kwargs
        )


def sdpa_layer_spec(qk_norm: bool, num_experts: int | None = None) -> ModuleSpec:
    """Megatron's local GPT layer spec (RMSNorm; MoE MLPs with num_experts SequentialMLP experts) with
    SDPACoreAttention as its core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, normalization="RMSNorm", qk_layernorm=qk_norm
    )
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def packed_seq_params(lengths: list[int], device: torch.device | str = "cpu") -> PackedSeqParams:
    """PackedSeqParams (thd) of sequences of these lengths laid end to end, with no padding."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"packed sequences need positive lengths, got {lengths}")
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32, device=device), 0)
    longest = max(lengths)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
    )
