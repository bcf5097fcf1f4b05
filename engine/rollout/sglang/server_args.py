"""SGLang server command lines: `python -m sglang.launch_server` with the run's arguments.

Guarantee: every [inference.sglang] key becomes `--key-with-dashes` followed by its value (a boolean
true is a bare flag, false is left out, a list gives one value per item), after the arguments the
launcher owns (model path, host, port, tp size, weight version), in the order the table lists them.
"""

from __future__ import annotations

import sys
from typing import Any

LAUNCH_MODULE = "sglang.launch_server"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def forwarded(args: dict[str, Any]) -> list[str]:
    """[inference.sglang] as command-line words (values already checked by check_server_args)."""
    words: list[str] = []
    for name, value in args.items():
        if value is False:
            continue
        words.append(flag(name))
        if value is True:
            continue
        words += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return words


def server_command(
    *,
    model_path: str,
    host: str,
    port: int,
    tp_size: int,
    weight_version: int,
    args: dict[str, Any],
    launcher: list[str] | None = None,
) -> list[str]:
    """The full argv of one server (launcher: the program and module to run, sglang's by default)."""
    program = launcher if launcher is not None else [sys.executable, "-m", LAUNCH_MODULE]
    return [
        *program,
        "--model-path",
        model_path,
        "--host",
        host,
        "--port",
        str(port),
        "--tp-size",
        str(tp_size),
        "--weight-version",
        str(weight_version),
        *forwarded(args),
    ]
