"""Prompt datasets: JSONL records -> token ids, and a seeded, resumable prompt order over epochs.

Guarantees: every record is checked when the file is loaded, and a malformed one raises a DataError
naming the file and line; the order is a pure function of (seed, epoch), so a run that stores its
position (`PromptOrder.state`) continues with no prompt skipped and none repeated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from engine.errors import DataError


class Prompt(msgspec.Struct, frozen=True, kw_only=True):
    """One prompt: its position in the file, token ids, rendered text, label and metadata."""

    index: int
    token_ids: tuple[int, ...]
    text: str
    label: str | None
    metadata: dict[str, Any]


def _messages(value: Any) -> list[dict[str, str]] | None:
    if not isinstance(value, list) or not value:
        return None
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return None
    return value


def render_prompt(tokenizer: Any, value: Any, apply_chat_template: bool) -> str | None:
    """Prompt text for one record's input, or None when the input has the wrong shape."""
    if apply_chat_template:
        messages = _messages(value)
        if messages is None:
            return None
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return value if isinstance(value, str) else None


def load_prompts(
    path: str | Path,
    tokenizer: Any,
    *,
    input_key: str = "input",
    label_key: str | None = "label",
    metadata_key: str = "metadata",
    apply_chat_template: bool = False,
) -> list[Prompt]:
    """Read and tokenize every record of a JSONL file, checking each one."""
    path = str(path)
    shape = "a list of {role, content} messages" if apply_chat_template else "a string"
    prompts: list[Prompt] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except OSError as e:
        raise DataError(f"cannot open: {e.strerror}", file=path) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text: {e.reason} at byte {e.start}", file=path) from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", file=path, line=lineno) from None
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}", file=path, line=lineno)
        if input_key not in record:
            raise DataError(f"missing input key {input_key!r}", file=path, line=lineno)
        text = render_prompt(tokenizer, record[input_key], apply_chat_template)
        if text is None:
            raise DataError(
                f"{input_key!r} must be {shape} (apply_chat_template={apply_chat_template})",
                file=path,
                line=lineno,
            )
        label = None
        if label_key is not None:
            if label_key not in record:
                raise DataError(f"missing label key {label_key!r}", file=path, line=lineno)
            label = record[label_key]
            label = label if isinstance(label, str) else json.dumps(label)
        metadata = record.get(metadata_key, {})
        if not isinstance(metadata, dict):
            raise DataError(f"{metadata_key!r} must be a JSON object", file=path, line=lineno)
        ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
        if not ids:
            raise DataError("prompt is empty after tokenization", file=path, line=lineno)
        prompts.append(Prompt(index=lineno - 1, token_ids=ids, text=text, label=label, metadata=metadata))
    if not prompts:
        raise DataError("no records", file=path)
    return prompts


class PromptOrder:
    """Which prompt comes next: epoch after epoch, each epoch a seeded permutation (or file order)."""

    def __init__(self, size: int, *, shuffle: bool, seed: int, epoch: int = 0, offset: int = 0) -> None:
        if size <= 0:
            raise ValueError("empty dataset")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch, self.offset = epoch, offset
        self._perm = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next(self) -> tuple[int, int]:
        """(position in the stream, dataset index) of the next prompt."""
        if self.offset == self.size:
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        position = self.epoch * self.size + self.offset
        index = int(self._perm[self.offset])
        self.offset += 1
        return position, index

    @property
    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


def load_datasets(
    rollout: Any, evaluation: Any, tokenizer: Any
) -> tuple[list[Prompt], dict[str, list[Prompt]]]:
    """The training prompts of [rollout] and every eval set of [eval] (eval keys default to rollout's)."""
    r, e = rollout, evaluation
    train = load_prompts(
        r.prompt_data,
        tokenizer,
        input_key=r.input_key,
        label_key=r.label_key,
        metadata_key=r.metadata_key,
        apply_chat_template=r.apply_chat_template,
    )
    evals = {
        name: load_prompts(
            path,
            tokenizer,
            input_key=e.input_key or r.input_key,
            label_key=e.label_key if e.label_key is not None else r.label_key,
            metadata_key=e.metadata_key or r.metadata_key,
            apply_chat_template=r.apply_chat_template
            if e.apply_chat_template is None
            else e.apply_chat_template,
        )
        for name, path in e.datasets.items()
    }
    return train, evals
