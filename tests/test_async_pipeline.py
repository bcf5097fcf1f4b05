"""The asynchronous pipeline end to end on the built-in task: staleness bound, dynamic sampling,
partial rollout, and the ledger that accounts for every group.

Each run is a real `python -m engine.launch` (Ray actors, ZeroMQ, Megatron learner). Assertions hold
whatever the timing: bounds, full batches, and the conservation of groups.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "rollout.batch_size=4",
    "rollout.n_samples_per_prompt=4",
    "perf.micro_batch_size=16",
    "optimizer.lr_warmup_iters=0",
    "eval.datasets={}",
    "eval.interval=0",
    "cluster.torch_threads=1",
    "--no-progress",
]


def run(tmp_path: Path, *overrides: str) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "engine.launch",
        str(ROOT / "configs" / "quickstart.toml"),
        f"output_dir={tmp_path}",
        "run_name=run",
        *BASE,
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def check_ledger(tmp_path: Path, rows: list[dict], steps: int, groups: int, n: int) -> dict:
    """Every batch full, and ledger.json accounts for every started group and every sent sample."""
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["rollout/samples"] == groups * n for r in rows)
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    p, b = ledger["producer"], ledger["buffer"]
    assert p["groups_assigned"] == steps * groups and ledger["trained"]["samples"] == steps * groups * n
    ended = p["groups_assigned"] + sum(p["groups_filtered"].values()) + p["surplus_cached"]
    ended += p["surplus_dropped"] + p["surplus_finished_dropped"]
    assert p["groups_started"] == ended, p
    # the buffer received every sample sent, refused none, and still holds the partial groups not taken
    assert b["received"] == p["samples_sent"] + p["partial_samples_sent"] and not b["rejected"]
    assert b["cached_partials"] == p["surplus_cached"] - p["partials_taken"]
    assert p["partials_taken"] == p["partials_resumed"] + p["partials_too_stale"] + p["partials_held"]
    assert p["samples_sent"] == p["groups_assigned"] * n
    return p


@pytest.mark.slow
def test_staleness_two_with_resume_on_weight_update(tmp_path: Path) -> None:
    rows = run(
        tmp_path, "rollout.num_rollout=6", "rollout.max_staleness=2", "rollout.on_weight_update=resume"
    )
    check_ledger(tmp_path, rows, 6, 4, 4)
    assert all(r["staleness/max"] <= 2 for r in rows)
    assert all(sum(v for k, v in r.items() if k.startswith("staleness/hist_")) == 16 for r in rows)


@pytest.mark.slow
def test_dynamic_sampling_drops_zero_variance_groups_and_fills_the_batch(tmp_path: Path) -> None:
    rows = run(
        tmp_path,
        "rollout.num_rollout=3",
        "rollout.n_samples_per_prompt=2",
        "perf.micro_batch_size=8",
        "rollout.dynamic_sampling_filter=reward_std",
    )
    p = check_ledger(tmp_path, rows, 3, 4, 2)
    assert p["groups_filtered"]["zero_reward_std"] > 0
    assert all(r["rollout/zero_std_groups"] == 0 for r in rows)


@pytest.mark.slow
def test_over_sampling_with_partial_rollout_accounts_for_every_surplus_group(tmp_path: Path) -> None:
    """Six groups start per round for four slots: two per round are surplus, cut and cached (or, when
    they finished before the cut, dropped). Which happens depends on timing; the ledger does not."""
    rows = run(
        tmp_path,
        "rollout.num_rollout=3",
        "rollout.over_sampling_batch_size=6",
        "rollout.partial_rollout=true",
        "rollout.mask_offpolicy_in_partial_rollout=true",
        "inference.max_batch_size=16",
    )
    p = check_ledger(tmp_path, rows, 3, 4, 4)
    surplus = p["surplus_cached"] + p["surplus_finished_dropped"]
    assert surplus == p["groups_started"] - 12 and surplus >= 2  # round 1 alone starts 6 for 4 slots
    assert all(r["staleness/max"] == 0 for r in rows)  # resumed tokens of older policies are masked out
