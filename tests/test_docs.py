"""The configuration reference documents every key of every section (so docs cannot drift)."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from engine.config import Config

DOC = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()


def block(heading: str) -> str:
    start = DOC.index(f"## {heading}\n")
    nxt = DOC.find("\n## ", start + 1)
    return DOC[start : nxt if nxt != -1 else None]


def test_every_key_is_documented() -> None:
    missing = []
    for field in msgspec.structs.fields(Config):
        if hasattr(field.type, "__struct_fields__"):
            text = block(f"[{field.name}]")
            missing += [
                f"{field.name}.{f.name}"
                for f in msgspec.structs.fields(field.type)
                if f"`{f.name}`" not in text
            ]
        elif f"`{field.name}`" not in block("Top level"):
            missing.append(field.name)
    assert not missing, f"undocumented config keys: {missing}"


def test_documented_sections_exist() -> None:
    sections = {f.name for f in msgspec.structs.fields(Config) if hasattr(f.type, "__struct_fields__")}
    assert set(re.findall(r"^## \[(\w+)\]", DOC, re.M)) == sections
