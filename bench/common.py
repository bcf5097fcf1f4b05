"""What every benchmark records next to its numbers: the machine, the software, the command."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def hardware() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_kib = int(
            next(
                x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")
            ).split()[1]
        )
        mem_gib = round(mem_kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def command() -> str:
    """The command line that reproduces a result, as run from the repository root."""
    script = Path(sys.argv[0])
    head = f"python -m bench.{script.stem}" if script.parent == RESULTS.parent else sys.argv[0]
    return " ".join([head, *sys.argv[1:]])


def write(name: str, payload: dict[str, Any], table: str) -> Path:
    """bench/results/<name>.json (with hardware and command) and <name>.md (the table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d"),
        "command": command(),
        "hardware": hardware(),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    hw = record["hardware"]
    machine = f"{hw['cpu']}, {hw['cores']} cores, {hw['memory_gib']} GiB; torch {hw['torch']}"
    header = f"# {name}\n\n{machine}; {record['date']}\n\n"
    (RESULTS / f"{name}.md").write_text(header + f"`{record['command']}`\n\n" + table + "\n")
    return path


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
