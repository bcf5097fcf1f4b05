"""Which embedded engine an actor builds, on which device, from [inference].

Guarantees: inference.device "auto" is CUDA when this process sees a GPU, else the CPU; engine_impl
"auto" is the static-cache engine on CUDA for the dense families it runs (engine/rollout/dense_forward.py)
and the transformers engine otherwise; "static" on a model it cannot run is a ConfigError naming
inference.engine_impl and the reason; "static" on the CPU runs eagerly (CUDA graphs need CUDA).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.errors import ConfigError
from engine.hf_config import load_hf_config
from engine.rollout.config import InferenceConfig
from engine.rollout.dense_forward import unsupported
from engine.rollout.hf_engine import HFEngine


def engine_device(cfg: InferenceConfig) -> str:
    if cfg.device != "auto":
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("is 'cuda' but this process sees no GPU", section="inference", key="device")
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def engine_impl(cfg: InferenceConfig, hf_config: Any, device: str) -> str:
    """ "static" or "transformers" for this model and device."""
    reason = unsupported(hf_config)
    if cfg.engine_impl == "static" and reason is not None:
        raise ConfigError(
            f"the static engine cannot run this model: {reason}", section="inference", key="engine_impl"
        )
    if cfg.engine_impl == "auto":
        return "static" if device == "cuda" and reason is None else "transformers"
    return cfg.engine_impl


def build_engine(
    model_path: str, cfg: InferenceConfig, *, seed: int, overrides: dict[str, Any] | None = None
) -> HFEngine:
    """The engine [inference] asks for (see the module docstring)."""
    device = engine_device(cfg)
    if engine_impl(cfg, load_hf_config(model_path, overrides), device) == "static":
        from engine.rollout.static_engine import StaticEngine

        return StaticEngine(
            model_path,
            dtype=cfg.dtype,
            seed=seed,
            device=device,
            overrides=overrides,
            max_batch_size=cfg.max_batch_size,
            context_length=cfg.context_length,
            max_prefill_tokens=cfg.max_prefill_tokens,
            cuda_graph=cfg.cuda_graph,
        )
    return HFEngine(
        model_path,
        dtype=cfg.dtype,
        attn_implementation=cfg.attn_implementation,
        seed=seed,
        device=device,
        overrides=overrides,
    )
