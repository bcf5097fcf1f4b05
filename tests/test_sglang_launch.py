"""A short training run end to end with inference.backend = "sglang": two stand-in SGLang servers
given as engine_urls, the learner pushing weights to them over a gloo weight-update group, synchronous
and with max_staleness = 1 (the push overlapping the next batch's generation)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sglang_fixtures import ROOT, start_fake
from tests.test_launch import SMALL, records

QUICKSTART = ROOT / "configs" / "quickstart.toml"


@pytest.mark.slow
@pytest.mark.parametrize(("staleness", "mode"), [(0, "continue"), (1, "resume")])
def test_two_step_run_on_sglang_servers(tmp_path: Path, staleness: int, mode: str) -> None:
    from engine.tasks import resolve_path

    model = Path(resolve_path("builtin:arithmetic/model"))
    servers = [start_fake(model) for _ in range(2)]
    try:
        urls = ", ".join(f"'{url}'" for _, url in servers)
        proc = subprocess.run(
            [sys.executable, "-m", "engine.launch", str(QUICKSTART), f"output_dir={tmp_path}", "run_name=run",
             *SMALL, "rollout.num_rollout=2", "eval.interval=0", "eval.datasets={}",
             "inference.backend=sglang", f"inference.engine_urls=[{urls}]", "inference.sglang={device='cpu'}",
             "inference.update_weight_buffer_size=65536", f"rollout.max_staleness={staleness}",
             f"rollout.on_weight_update={mode}"],
            cwd=ROOT, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = records(tmp_path)
        assert [r["step"] for r in rows] == [1, 2] and rows[1]["version"] == 2
        assert rows[0]["rollout/samples"] == 16
        import asyncio

        from tests.test_sglang_weights import call

        for _, url in servers:  # every server ends at the last pushed version
            assert asyncio.run(call(url, "GET", "/model_info"))["weight_version"] == "2"
            assert len(asyncio.run(call(url, "GET", "/fake/received"))["names"]) > 0
        ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
        assert ledger["trained"]["samples"] == 32
    finally:
        for proc_, _ in servers:
            proc_.kill()
            proc_.wait()
