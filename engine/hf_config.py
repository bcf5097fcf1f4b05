"""The checkpoint's transformers config, with the [model] overrides applied, for learner and engines alike.

Both sides build their model from this one function, so an override (say rope_theta) can never reach
the learner without reaching the engines too.
"""

from __future__ import annotations

from typing import Any

from engine.errors import ConfigError


def load_hf_config(path: str, overrides: dict[str, Any] | None = None) -> Any:
    """The checkpoint's transformers config with [model] overrides applied (unknown fields are errors)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot read an HF config from {path!r}: {e}", section="ckpt", key="hf_checkpoint"
        ) from None
    for key, value in (overrides or {}).items():
        rope = getattr(config, "rope_parameters", None)
        if not hasattr(config, key) and isinstance(rope, dict) and key in rope:
            rope[key] = value  # transformers 5 keeps rope_theta and friends in rope_parameters
            continue
        if not hasattr(config, key):
            raise ConfigError(
                f"{key!r} is not a field of the {type(config).__name__}",
                section="model",
                key=f"overrides.{key}",
            )
        setattr(config, key, value)
    return config


TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def torch_dtype(name: str) -> Any:
    """The torch dtype called `name` in config files."""
    import torch

    return getattr(torch, TORCH_DTYPES[name])
