"""Resuming from a checkpoint, end to end (`python -m engine.launch`, Ray actors, Megatron learner).

A synchronous run stopped and resumed trains the very batches (same prompts, same order, same batch
digests) and reaches the very weights of a run that never stopped. An asynchronous run with partial
rollout resumed after a crash trains no prompt twice and skips none: every prompt drawn before the
checkpoint was trained before it, dropped, or is in the checkpoint (pending or cached) for the resumed
run. A `latest` naming a missing iteration stops the launch before anything starts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.rollout.data import PromptOrder
from engine.rollout.progress import decode_state
from tests.helpers import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "rollout.batch_size=4",
    "rollout.n_samples_per_prompt=4",
    "perf.micro_batch_size=16",
    "optimizer.lr_warmup_iters=0",
    "optimizer.lr_decay_iters=6",  # the same schedule however many steps a run has
    "eval.datasets={}",
    "eval.interval=0",
    "cluster.torch_threads=1",
    "--no-progress",
]


def launch(tmp_path: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "engine.launch",
        str(ROOT / "configs" / "quickstart.toml"),
        f"output_dir={tmp_path / 'runs'}",
        f"run_name={name}",
        *BASE,
        *overrides,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def run(tmp_path: Path, name: str, *overrides: str) -> dict[int, dict]:
    """Launch and return the metrics by step (and the trained prompts of each step under "prompts")."""
    proc = launch(tmp_path, name, *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    directory = tmp_path / "runs" / name
    rows = {r["step"]: r for r in map(json.loads, (directory / "metrics.jsonl").read_text().splitlines())}
    for line in (directory / "prompt_ledger.jsonl").read_text().splitlines():
        entry = json.loads(line)
        rows[entry["step"]]["prompts"] = entry["prompt_index"]
    return rows


def crash_after(save: Path, step: int, into: Path) -> Path:
    """The save directory as a crash right after step's checkpoint would have left it."""
    name = f"iter_{step:07d}"
    shutil.copytree(save / name, into / name)
    (into / "latest").write_text(f"{step}\n")
    return into


def weights(save: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(save / f"iter_{step:07d}" / "hf" / "model.safetensors"))


@pytest.mark.slow
def test_synchronous_resume_trains_the_same_batches_to_the_same_weights(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    straight = run(tmp_path, "straight", "rollout.num_rollout=4", f"ckpt.save={a}", "ckpt.save_interval=2")
    first = run(tmp_path, "first", "rollout.num_rollout=2", f"ckpt.save={b}")
    resumed = run(tmp_path, "resumed", "rollout.num_rollout=4", f"ckpt.save={b}", f"ckpt.load={b}")
    # Resuming from the straight run's step-2 checkpoint restarts the groups in flight at that save.
    c = crash_after(a, 2, tmp_path / "c")
    state = decode_state((c / "iter_0000002" / "rollout_state.msgpack").read_bytes())
    assert state.offset == 2 * 4 + state.dropped + len(state.pending) + len(state.cached)
    crashed = run(tmp_path, "crashed", "rollout.num_rollout=4", f"ckpt.save={c}", f"ckpt.load={c}")

    assert sorted(straight) == [1, 2, 3, 4] and sorted(first) == [1, 2]
    assert sorted(resumed) == sorted(crashed) == [3, 4]
    for key in ("rollout/batch_digest", "prompts", "train/lr", "version"):
        expected = [straight[s][key] for s in (1, 2, 3, 4)]
        assert [first[1][key], first[2][key], resumed[3][key], resumed[4][key]] == expected, key
        assert [crashed[3][key], crashed[4][key]] == expected[2:], key
    assert len({p for s in straight.values() for p in s["prompts"]}) == 16  # no prompt twice
    assert [(d / "latest").read_text() for d in (a, b, c)] == ["4\n"] * 3
    assert sorted(p.name for p in a.iterdir()) == ["iter_0000002", "iter_0000004", "latest"]
    final = weights(a, 4)
    for save in (b, c):
        resumed_final = weights(save, 4)
        assert all(torch.allclose(resumed_final[k], t, atol=1e-5, rtol=0) for k, t in final.items())
    assert not all(torch.equal(weights(a, 2)[k], t) for k, t in final.items())  # steps 3-4 trained


@pytest.mark.slow
def test_asynchronous_resume_with_partial_rollout_trains_every_prompt_once(tmp_path: Path) -> None:
    """k = 1, over-sampling 8 groups for 4 slots, partial rollout, a random model whose responses run
    long (so surplus groups are cut mid-way and cached): crash after step 2's checkpoint, resume."""
    model = make_checkpoint(tmp_path / "model", "qwen2", seed=5)
    common = [
        f"ckpt.hf_checkpoint={model}",
        "rollout.custom_rm_path=tests.rewards_custom:length_reward",
        "rollout.max_response_len=32",
        "rollout.max_staleness=1",
        "rollout.over_sampling_batch_size=8",
        "rollout.partial_rollout=true",
        "inference.max_batch_size=4",
    ]
    save = tmp_path / "save"
    first = run(
        tmp_path, "first", *common, "rollout.num_rollout=3", f"ckpt.save={save}", "ckpt.save_interval=2"
    )
    load = crash_after(save, 2, tmp_path / "crashed")
    state = decode_state((load / "iter_0000002" / "rollout_state.msgpack").read_bytes())
    resumed = run(
        tmp_path, "resumed", *common, "rollout.num_rollout=5", f"ckpt.save={load}", f"ckpt.load={load}"
    )

    order = PromptOrder(9800, shuffle=True, seed=42)
    drawn = [order.next()[1] for _ in range(state.offset)]
    trained = [p for s in (1, 2) for p in first[s]["prompts"]]  # trained before the checkpoint
    pending = [p.prompt_index for p in state.pending]
    cached = [g[0].prompt_index for g in state.cached]
    assert len(set(trained + pending + cached)) == len(trained + pending + cached)  # disjoint, no repeats
    assert set(trained + pending + cached) <= set(drawn) and state.epoch == 0
    assert len(trained) + len(pending) + len(cached) + state.dropped == state.offset  # none skipped
    assert pending  # batch 2 was being generated (k = 1) while batch 1 trained
    after = [p for s in (3, 4, 5) for p in resumed[s]["prompts"]]
    assert len(set(after)) == len(after) and not set(after) & set(trained)
    assert set(after) & set(drawn) <= set(pending + cached)  # of the earlier prompts, only those handed on
    assert all(len(r["prompts"]) == 4 and r["staleness/max"] <= 1 for r in resumed.values())
    ledger = json.loads((tmp_path / "runs" / "resumed" / "ledger.json").read_text())
    p, b = ledger["producer"], ledger["buffer"]
    assert p["partials_restored"] == len(cached) and p["groups_pending_restored"] == len(pending)
    assert p["groups_assigned"] == 3 * 4 and not b["rejected"]
    assert b["cached_partials"] == p["surplus_cached"] + p["partials_restored"] - p["partials_taken"]


def test_latest_naming_a_missing_iteration_fails_before_start(tmp_path: Path) -> None:
    save = tmp_path / "save"
    save.mkdir()
    (save / "latest").write_text("3\n")
    proc = launch(tmp_path, "run", f"ckpt.load={save}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (
        f"[ckpt] load: {save / 'latest'} names iteration 3, but {save / 'iter_0000003'} does not exist"
        in (proc.stderr)
    )
    assert not (tmp_path / "runs").exists()
