"""Helpers for tests against the stand-in SGLang server (tests/fakes/sglang_server.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from engine.cluster import free_port
from engine.rollout.sglang.http import SglangHttp

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = [sys.executable, "-m", "tests.fakes.sglang_server"]


def start_fake(model_path: Path, *, version: int = 0) -> tuple[subprocess.Popen, str]:
    """A stand-in server process on a free loopback port, healthy when this returns."""
    port = free_port()
    proc = subprocess.Popen(
        [*LAUNCHER, "--model-path", str(model_path), "--host", "127.0.0.1", "--port", str(port),
         "--weight-version", str(version)],
        cwd=ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    async def wait() -> None:
        http = SglangHttp(url)
        try:
            while not await http.healthy(timeout=5):
                if proc.poll() is not None:
                    raise RuntimeError(f"stand-in server exited with {proc.returncode}")
                await asyncio.sleep(0.2)
        finally:
            await http.close()

    asyncio.run(wait())
    return proc, url
