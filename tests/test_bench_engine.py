"""bench/engine_gpu.py in its tiny CPU mode: every row of the table is measured and the log-prob
mismatch against the learner's recompute is small (the same bf16 weights, a different forward)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_engine_benchmark_runs_every_case(tmp_path) -> None:
    cmd = [sys.executable, "-m", "bench.engine_gpu", "--tiny", "--device", "cpu", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    record = json.loads((tmp_path / "engine_gpu_tiny_cpu.json").read_text())
    engines = {(c["batch"], c["engine"]) for c in record["cases"]}
    for batch in (4, 8):
        assert {
            (batch, "static, eager"),
            (batch, "static via engine actor"),
            (batch, "transformers generate"),
        } <= engines
    for case in record["cases"]:
        assert case["tokens"] == case["batch"] * record["response"] and case["tokens_per_s"] > 0
    kl = record["logprob_mismatch"]
    assert kl["kl_model"] == "megatron" and kl["tokens"] == 4 * record["response"]
    assert 0 <= kl["mismatch_kl"] < 1e-3 and kl["logprob_abs_diff"] < 0.05
    assert (tmp_path / "engine_gpu_tiny_cpu.md").read_text().count("|") > 20
