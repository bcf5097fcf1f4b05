"""The forward pass of a dense decoder (Llama, Qwen2, Qwen3) over a slot KV cache, on the HF weights.

Why our own forward rather than the transformers model class with a StaticCache: continuous batching
puts every row at its own position (rows join and leave between steps), while transformers' static cache
takes one cache position vector for the whole batch; and a decode step here is a fixed sequence of
kernels on fixed buffers, which is what a CUDA graph replays. The forward reads the HF model's own
parameters (no copy): at construction the q/k/v and gate/up weights of each layer are packed into one
tensor each and the HF parameters become views of it, so a weight update copied into the HF-named
parameters lands in the packed tensors too.

Guarantee: for the supported configurations the logits equal those of the transformers model class on
the same tokens (up to floating-point reordering): the same RMSNorm (float32, cast back before the
weight), RoPE from the model's own inverse frequencies and attention scaling (rope types whose
frequencies do not depend on the sequence length), grouped-query attention with q/k/v (and o) biases
where the checkpoint has them and q/k norms for Qwen3, SwiGLU MLP, tied or untied output layer.
Anything else (mixture-of-experts layers, sliding-window attention, another activation, MLP biases,
length-dependent RoPE) is refused by `unsupported` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.learner.hf_bridge import FAMILIES
from engine.rollout.kv_cache import SlotCache

STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def unsupported(hf_config: Any) -> str | None:
    """Why this forward cannot run the configuration, or None when it can."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    family = next((FAMILIES[a] for a in archs if a in FAMILIES), None)
    if family is None:
        return f"architecture {archs or hf_config.model_type!r} is not one of {', '.join(FAMILIES)}"
    if family.moe:
        return f"{archs[0]} has mixture-of-experts layers (the transformers engine runs them)"
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        return f"hidden_act {hf_config.hidden_act!r} is not silu"
    if getattr(hf_config, "mlp_bias", False):
        return "mlp_bias = true is not supported"
    layer_types = getattr(hf_config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or getattr(hf_config, "use_sliding_window", False):
        return "sliding-window attention is not supported"
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r} is not one of {', '.join(STATIC_ROPE_TYPES)}"
    return None


@dataclass
class Layer:
    ln1: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    ln2: torch.Tensor
    gate_up_w: torch.Tensor
    down_w: torch.Tensor


def _pack(linears: list[torch.nn.Linear], attr: str) -> torch.Tensor | None:
    """Concatenate the linears' weights (or biases) along dim 0 and make each a view of the result."""
    parts = [getattr(m, attr) for m in linears]
    if all(p is None for p in parts):
        return None
    packed = torch.cat([p.data for p in parts], dim=0)
    start = 0
    for p in parts:
        p.data = packed[start : start + p.shape[0]]
        start += p.shape[0]
    return packed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DenseForward:
    """Prefill and decode over a SlotCache, reading the weights of a transformers *ForCausalLM model."""

    def __init__(self, model: Any, hf_config: Any, positions: int) -> None:
        reason = unsupported(hf_config)
        if reason is not None:
            raise ValueError(reason)
        c = hf_config
        self.heads = c.num_attention_heads
        self.kv_heads = getattr(c, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.heads
        self.eps = c.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.vocab = c.vocab_size
        base = model.model
        self.embed = base.embed_tokens.weight
        self.norm = base.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = []
        with torch.no_grad():
            for layer in base.layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
                q_norm = getattr(attn, "q_norm", None)
                k_norm = getattr(attn, "k_norm", None)
                self.layers.append(
                    Layer(
                        ln1=layer.input_layernorm.weight,
                        qkv_w=_pack(qkv, "weight"),  # type: ignore[arg-type]
                        qkv_b=_pack(qkv, "bias"),
                        q_norm=None if q_norm is None else q_norm.weight,
                        k_norm=None if k_norm is None else k_norm.weight,
                        o_w=attn.o_proj.weight,
                        o_b=attn.o_proj.bias,
                        ln2=layer.post_attention_layernorm.weight,
                        gate_up_w=_pack([mlp.gate_proj, mlp.up_proj], "weight"),  # type: ignore[arg-type]
                        down_w=mlp.down_proj.weight,
                    )
                )
            # RoPE as transformers computes it: float32 angles, cos/sin times the attention scaling,
            # cast to the activations' dtype.
            rotary = base.rotary_emb
            inv_freq = rotary.inv_freq.to(torch.float32)
            pos = torch.arange(positions, device=inv_freq.device, dtype=torch.float32)
            freqs = pos[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            dtype = self.embed.dtype
            self.cos = (emb.cos() * rotary.attention_scaling).to(dtype)
            self.sin = (emb.sin() * rotary.attention_scaling).to(dtype)

    def _qkv(
        self, layer: Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [..., heads, hd], k and v [..., kv_heads, hd] of normed hidden states h [..., hidden]."""
        hd = self.head_dim
        qkv = F.linear(h, layer.qkv_w, layer.qkv_b)
        q, k, v = qkv.split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        q = q.unflatten(-1, (self.heads, hd))
        k = k.unflatten(-1, (self.kv_heads, hd))
        v = v.unflatten(-1, (self.kv_heads, hd))
        if layer.q_norm is not None and layer.k_norm is not None:
            q, k = rms_norm(q, layer.q_norm, self.eps), rms_norm(k, layer.k_norm, self.eps)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def _finish_layer(self, layer: Layer, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + F.linear(attn, layer.o_w, layer.o_b)
        gate, up = F.linear(rms_norm(x, layer.ln2, self.eps), layer.gate_up_w).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.down_w)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(x, self.norm, self.eps), self.lm_head).float()

    def prefill(
        self, cache: SlotCache, ids: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """Right-padded prompts ids [n, S] with lengths [n] into cache slots rows [n]: writes positions
        0..S-1 of each slot (those past a prompt's length are overwritten before they are read) and
        returns the float32 logits [n, V] at each prompt's last token."""
        n, width = ids.shape
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[:width, None, :], self.sin[:width, None, :]
        group = self.heads // self.kv_heads
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, rms_norm(x, layer.ln1, self.eps), cos, sin)
            cache.keys[i, rows, :width] = k
            cache.values[i, rows, :width] = v
            # right padding: causal attention alone keeps every real token off the padding
            kk = k.transpose(1, 2).repeat_interleave(group, dim=1)
            vv = v.transpose(1, 2).repeat_interleave(group, dim=1)
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, is_causal=True, scale=self.scale)
            x = self._finish_layer(layer, x, attn.transpose(1, 2).flatten(-2))
        last = x[torch.arange(n, device=x.device), lengths - 1]
        return self.logits(last)

    def decode(
        self, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, span: int
    ) -> torch.Tensor:
        """One token per row: tokens [B] at positions [B] of slots rows [B] (rows must be 0..B-1: the
        attention reads slots 0..B-1 directly); keys up to position `span`-1 are read, masked past each
        row's own position. Writes the tokens' keys and values; returns float32 logits [B, V]."""
        b = tokens.shape[0]
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        group = self.heads // self.kv_heads
        visible = torch.arange(span, device=tokens.device)[None, :] <= positions[:, None]
        mask = visible[:, None, None, :]  # [B, 1, 1, span]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, rms_norm(x, layer.ln1, self.eps), cos, sin)
            cache.keys[i, rows, positions] = k
            cache.values[i, rows, positions] = v
            keys = cache.keys[i, :b, :span].transpose(1, 2)  # [B, kv_heads, span, hd]
            values = cache.values[i, :b, :span].transpose(1, 2)
            # the query heads of one KV group attend as a short query sequence: no repeated keys
            grouped = q.view(b, self.kv_heads, group, self.head_dim)
            attn = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=self.scale)
            x = self._finish_layer(layer, x, attn.reshape(b, self.heads * self.head_dim))
        return self.logits(x)
