"""Shared base for config sections: strict msgspec Structs with small, named value checks.

Each section of the TOML file is a Struct owned by the component that uses it. Unknown keys and wrong
types are rejected by msgspec while parsing; `require` turns a failed value check into a ConfigError that
names the section and key.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

from engine.errors import ConfigError


class Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A config section. Subclasses set `section_name` and override `check`."""

    section_name: ClassVar[str] = ""

    def check(self) -> None:
        """Value checks local to this section; cross-section checks live in engine.config."""

    def require(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(message, section=self.section_name, key=key)

    def positive(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if value is not None:
                self.require(value > 0, key, f"must be > 0, got {value!r}")

    def non_negative(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if value is not None:
                self.require(value >= 0, key, f"must be >= 0, got {value!r}")
