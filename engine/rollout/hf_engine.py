"""The embedded inference engine: a transformers model class and a batched decode loop with log-probs.

Guarantees: each response token comes with log_softmax(logits / temperature) of that token and the
policy version of the weights that produced it; a request stops at any of its stop tokens (the model's
EOS included, and kept as the last response token) or at max_new_tokens; `load_weights` replaces
every parameter in place from HF-named tensors (checkpoint or in-memory names), refusing unknown,
missing or misshapen names.
"""

from __future__ import annotations

import inspect
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
        self.cache_kw = cache_kwarg(self.model)
        self.device = torch.device(device)
        self._seeds = np.random.default_rng(seed)
        self.version = 0
        eos = self.config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self._params = dict(self.model.named_parameters())

    def load_weights(self, named: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy HF-named tensors into the model in place and record the new policy version.

        Per-expert checkpoint names (`mlp.experts.{e}.gate_proj.weight`) are fused into the model's 3-D
        expert parameters first (engine/learner/hf_moe.py)."""
        from engine.learner.hf_moe import to_transformers_layout

        named = to_transformers_layout(named, self._params)
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

    def release_memory(self) -> None:
        """Colocated mode, while the learner trains: give cached device memory back (the KV caches of
        finished batches); the weights stay."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        """Undo release_memory (nothing to restore: caches are allocated per batch)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self._params.items()}

    def start(self, requests: list[GenerateRequest]) -> DecodeBatch:
        """Prefill a batch; tokens are then drawn one step at a time with DecodeBatch.step."""
        return DecodeBatch(self, requests)

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateResult]:
        """Run a batch of requests to completion."""
        batch = self.start(requests)
        results = []
        while not batch.done:
            results += batch.step()
        order = {r.rid: i for i, r in enumerate(requests)}
        return sorted(results, key=lambda r: order[r.rid])


def cache_kwarg(model: torch.nn.Module) -> str:
    """The name under which the installed transformers' forward takes the KV cache: `cache` from 5.24
    on, `past_key_values` before. An unknown keyword is swallowed by the model's **kwargs, so passing the
    wrong one silently decodes without a cache (every step sees one token)."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise EngineError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`")


class DecodeBatch:
    """Requests decoding together: left-padded prefill, then one token per row per step.

    Between steps the owner may replace the engine's weights (later tokens then carry the new version:
    a token's version is the version of the weights that computed its distribution) or abort rows
    (their results come back at once with the tokens so far and finish_reason "abort").
    """

    @torch.no_grad()
    def __init__(self, engine: HFEngine, requests: list[GenerateRequest]) -> None:
        self.engine, self.requests = engine, requests
        dev = engine.device
        n = len(requests)
        lens = [len(r.prompt_ids) for r in requests]
        width = max(lens)
        ids = torch.zeros(n, width, dtype=torch.long, device=dev)
        self.attn = torch.zeros(n, width, dtype=torch.long, device=dev)
        for i, r in enumerate(requests):
            ids[i, width - lens[i] :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            self.attn[i, width - lens[i] :] = 1
        self.positions = (self.attn.cumsum(-1) - 1).clamp(min=0)
        self.temperature = torch.tensor(
            [r.params.temperature for r in requests], dtype=torch.float32, device=dev
        )
        self.top_p = torch.tensor([r.params.top_p for r in requests], dtype=torch.float32, device=dev)
        self.top_k = torch.tensor([r.params.top_k for r in requests], dtype=torch.long, device=dev)
        self.budgets = [r.params.max_new_tokens for r in requests]
        self.stops = [engine.eos_ids | set(r.params.stop_token_ids) for r in requests]
        self.seeds = np.array(
            [r.seed if r.seed is not None else int(engine._seeds.integers(1 << 62)) for r in requests],
            dtype=np.uint64,
        )
        self.offsets = np.array([r.sample_offset for r in requests], dtype=np.int64)
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.logprobs: list[list[float]] = [[] for _ in requests]
        self.versions: list[list[int]] = [[] for _ in requests]
        self.reasons: list[str | None] = [None if b > 0 else "length" for b in self.budgets]
        self.reported = [False] * n
        self.cache = DynamicCache()
        self.cache_kw = engine.cache_kw
        out = engine.model(
            input_ids=ids,
            attention_mask=self.attn,
            position_ids=self.positions,
            **{self.cache_kw: self.cache},
            use_cache=True,
            logits_to_keep=1,
        )
        self.logits = out.logits[:, -1]
        self.logits_version = engine.version
        self.steps = 0

    @property
    def done(self) -> bool:
        return all(self.reported)

    # A DecodeBatch takes no requests once started (the static engine's SlotBatch does).
    free_slots = 0

    def _collect(self) -> list[GenerateResult]:
        out = []
        for i, r in enumerate(self.requests):
            if self.reasons[i] is not None and not self.reported[i]:
                self.reported[i] = True
                out.append(
                    GenerateResult(
                        rid=r.rid,
                        token_ids=self.tokens[i],
                        logprobs=self.logprobs[i],
                        versions=self.versions[i],
                        finish_reason=self.reasons[i],  # type: ignore[arg-type]
                    )
                )
        return out

    @torch.no_grad()
    def step(self) -> list[GenerateResult]:
        """Draw one token for every live row; returns the rows that finished now."""
        if all(reason is not None for reason in self.reasons):
            return self._collect()
        uniforms = position_uniforms(self.seeds, self.offsets + self.steps)
        toks_t, lps_t = sample_next(self.logits, self.temperature, self.top_p, self.top_k, uniforms)
        toks, lps = toks_t.tolist(), lps_t.tolist()
        for i in range(len(self.requests)):
            if self.reasons[i] is not None:
                continue
            self.tokens[i].append(toks[i])
            self.logprobs[i].append(lps[i])
            self.versions[i].append(self.logits_version)
            if toks[i] in self.stops[i]:
                self.reasons[i] = "stop"
            elif len(self.tokens[i]) >= self.budgets[i]:
                self.reasons[i] = "length"
        self.steps += 1
        if not all(reason is not None for reason in self.reasons):
            self.attn = torch.cat([self.attn, self.attn.new_ones(len(self.requests), 1)], dim=1)
            self.positions = self.positions[:, -1:] + 1
            out = self.engine.model(
                input_ids=toks_t[:, None],
                attention_mask=self.attn,
                position_ids=self.positions,
                **{self.cache_kw: self.cache},
                use_cache=True,
            )
            self.logits = out.logits[:, -1]
            self.logits_version = self.engine.version
        return self._collect()

    def abort(self, rids: set[int] | None = None) -> list[GenerateResult]:
        """Stop rows now (all rows when rids is None); returns their partial results."""
        for i, r in enumerate(self.requests):
            if self.reasons[i] is None and (rids is None or r.rid in rids):
                self.reasons[i] = "abort"
        return self._collect()
