"""Errors that name where bad input is: file, line, section and key.

Every user-facing failure in config or data loading raises one of these before any actor starts, so a
typo costs a second, not a cluster start-up.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of the engine's own errors."""


class ConfigError(EngineError):
    """A bad configuration value: names the section, key, values and, when known, file and line."""

    def __init__(
        self,
        message: str,
        *,
        section: str | None = None,
        key: str | None = None,
        file: str | None = None,
        line: int | None = None,
    ) -> None:
        self.message = message
        self.section = section
        self.key = key
        self.file = file
        self.line = line
        super().__init__(str(self))

    def located(self, file: str | None, line: int | None) -> ConfigError:
        """The same error with a file (and line) attached."""
        return ConfigError(self.message, section=self.section, key=self.key, file=file, line=line)

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        what = ""
        if self.section and self.key:
            what = f"[{self.section}] {self.key}: "
        elif self.section:
            what = f"[{self.section}] "
        elif self.key:
            what = f"{self.key}: "
        return f"config error: {where}{what}{self.message}"


class DataError(EngineError):
    """A malformed data record: names the file and the 1-based line."""

    def __init__(self, message: str, *, file: str, line: int | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"data error: {where}: {message}")


class WireError(EngineError):
    """A message on a sample socket that is not a valid sample; `reason` is the counter it goes under
    (undecodable, wrong_schema, wrong_version, too_large, invalid_sample, non_finite)."""

    def __init__(self, message: str, *, reason: str = "invalid_sample") -> None:
        self.reason = reason
        super().__init__(message)
