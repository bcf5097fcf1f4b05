"""The embedded inference engine: a transformers model class and a batched decode loop with log-probs.

Guarantees: each response token comes with log_softmax(logits / temperature) of that token and the
policy version of the weights that produced it; a request stops at any of its stop tokens (the model's
EOS included, and kept as the last response token) or at max_new_tokens; `load_weights` replaces
every parameter in place from HF-named tensors, refusing unknown, missing or misshapen names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

from engine.errors import EngineError
from engine.hf_config import load_hf_config, torch_dtype
from engine.rollout.sampling import position_uniforms, sample_next
from engine.wire import GenerateRequest, GenerateResult


class WeightUpdateError(EngineError):
    """Pushed weights do not match the engine's model."""


class HFEngine:
    """One model replica on one device. Not thread-safe: its owner serialises calls."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        seed: int = 0,
        device: str = "cpu",
        overrides: dict[str, Any] | None = None,
    ) -> None:
        transformers.utils.logging.disable_progress_bar()
        self.config = load_hf_config(model_path, overrides)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, config=self.config, dtype=torch_dtype(dtype), attn_implementation=attn_implementation
        ).to(device)
        self.model.eval()
        self.device = torch.device(device)
        self._seeds = np.random.default_rng(seed)
        self.version = 0
        eos = self.config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self._params = dict(self.model.named_parameters())

    def load_weights(self, named: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy HF-named tensors into the model in place and record the new policy version."""
        unknown = sorted(set(named) - set(self._params))
        missing = sorted(set(self._params) - set(named))
        if unknown or missing:
            raise WeightUpdateError(
                f"weight names differ from the model: unknown {unknown[:5]}, missing {missing[:5]}"
            )
        for name, tensor in named.items():
            param = self._params[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise WeightUpdateError(
                    f"{name}: pushed shape {tuple(tensor.shape)}, model has {tuple(param.shape)}"
                )
        with torch.no_grad():
            for name, tensor in named.items():
                self._params[name].copy_(tensor)
        self.version = version

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self._params.items()}

    @torch.no_grad()
    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Run a batch of requests to completion (left-padded prefill, then one token per step)."""
        if not requests:
            return []
        dev = self.device
        batch = len(requests)
        prompt_lens = [len(r.prompt_ids) for r in requests]
        width = max(prompt_lens)
        ids = torch.zeros(batch, width, dtype=torch.long, device=dev)
        attn = torch.zeros(batch, width, dtype=torch.long, device=dev)
        for i, r in enumerate(requests):
            ids[i, width - prompt_lens[i] :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attn[i, width - prompt_lens[i] :] = 1
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        temperature = torch.tensor([r.params.temperature for r in requests], dtype=torch.float32, device=dev)
        top_p = torch.tensor([r.params.top_p for r in requests], dtype=torch.float32, device=dev)
        top_k = torch.tensor([r.params.top_k for r in requests], dtype=torch.long, device=dev)
        budgets = [r.params.max_new_tokens for r in requests]
        stops = [self.eos_ids | set(r.params.stop_token_ids) for r in requests]
        seeds = np.array(
            [r.seed if r.seed is not None else int(self._seeds.integers(1 << 62)) for r in requests],
            dtype=np.uint64,
        )

        tokens: list[list[int]] = [[] for _ in requests]
        logprobs: list[list[float]] = [[] for _ in requests]
        reasons: list[str | None] = [None if b > 0 else "length" for b in budgets]
        cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        for step in range(max(budgets)):
            uniforms = position_uniforms(seeds, step)
            next_tok, next_lp = sample_next(out.logits[:, -1], temperature, top_p, top_k, uniforms)
            toks, lps = next_tok.tolist(), next_lp.tolist()
            for i in range(batch):
                if reasons[i] is not None:
                    continue
                tokens[i].append(toks[i])
                logprobs[i].append(lps[i])
                if toks[i] in stops[i]:
                    reasons[i] = "stop"
                elif len(tokens[i]) >= budgets[i]:
                    reasons[i] = "length"
            if all(reason is not None for reason in reasons):
                break
            attn = torch.cat([attn, attn.new_ones(batch, 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=next_tok[:, None],
                attention_mask=attn,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            )
        return [
            GenerateResult(
                rid=r.rid,
                token_ids=tokens[i],
                logprobs=logprobs[i],
                versions=[self.version] * len(tokens[i]),
                finish_reason=reasons[i] or "length",
            )
            for i, r in enumerate(requests)
        ]
