"""Built-in tasks: data, tokenizer and a warm-started checkpoint made by project code, no download.

Config paths of the form `builtin:<task>/<file>` (for example `builtin:arithmetic/model`) resolve to a
cache directory that the task builds on first use. Guarantee: a build either completes and is renamed
into place atomically, or leaves nothing behind; concurrent resolvers wait on a file lock and build once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from engine.errors import ConfigError

PREFIX = "builtin:"


def _builders() -> dict[str, tuple[str, Callable[[Path], None]]]:
    from engine.tasks import arithmetic

    return {"arithmetic": (arithmetic.RECIPE_VERSION, arithmetic.build)}


def cache_root() -> Path:
    return Path(os.environ.get("ENGINE_CACHE_DIR", Path.home() / ".cache" / "engine"))


def ensure_task(name: str) -> Path:
    """The directory holding task `name`, built on first use."""
    builders = _builders()
    if name not in builders:
        raise ConfigError(f"unknown built-in task {name!r} (available: {', '.join(sorted(builders))})")
    version, build = builders[name]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}-{version}"
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "DONE").exists():
            tmp = root / f".{name}-{version}.building"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                build(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            (tmp / "DONE").write_text(version)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    return target


def resolve_path(path: str) -> str:
    """`builtin:<task>/<sub>` -> a real path (building the task if needed); other paths unchanged."""
    if not path.startswith(PREFIX):
        return path
    name, _, sub = path[len(PREFIX) :].partition("/")
    root = ensure_task(name)
    resolved = root / sub
    if not sub or not resolved.exists():
        have = ", ".join(
            sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.name != "DONE")
        )
        raise ConfigError(f"{path!r}: built-in task {name!r} has no {sub!r} (it has: {have})")
    return str(resolved)
