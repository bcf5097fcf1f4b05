"""Reading HF checkpoints and writing them: safetensors files plus config and tokenizer.

Guarantee: `save_hf_checkpoint` writes a directory that transformers' from_pretrained and this
project's loaders read back to the same tensors; it writes into a temporary directory and renames it into
place, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.errors import ConfigError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


def load_hf_state(path: str) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single file or sharded with an index)."""
    root = Path(path)
    single = root / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = root / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(root / f)))
        return state
    raise ConfigError(f"{path!r} has no model.safetensors (or index)", section="ckpt", key="hf_checkpoint")


def save_hf_checkpoint(
    tensors: dict[str, torch.Tensor], hf_config: Any, source: str, out: str | Path
) -> Path:
    """Write tensors as an HF checkpoint at `out`, with config and tokenizer files copied from `source`."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(tmp / "model.safetensors"),
        metadata={"format": "pt"},
    )
    hf_config.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def bucketize(named: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Cut HF-named tensors, in order, into buckets of at most max_bytes each (a tensor larger than
    max_bytes travels alone): the unit of a weight push, so no message holds more than one bucket."""
    buckets: list[dict[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named.items():
        nbytes = tensor.numel() * tensor.element_size()
        if not buckets or (size + nbytes > max_bytes and buckets[-1]):
            buckets.append({})
            size = 0
        buckets[-1][name] = tensor
        size += nbytes
    return buckets
