"""`python -m engine.launch` end to end: a short run, bad input, a failing actor, and Ctrl-C."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.toml"
SMALL = [
    "rollout.batch_size=4",
    "rollout.n_samples_per_prompt=4",
    "perf.micro_batch_size=8",
    "eval.n_samples_per_eval_prompt=1",
    "optimizer.lr_warmup_iters=0",
    "--no-progress",
]


def command(tmp_path: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "engine.launch",
        str(QUICKSTART),
        f"output_dir={tmp_path}",
        "run_name=run",
        *overrides,
    ]


def launch(tmp_path: Path, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(tmp_path, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def eval_sets(tmp_path: Path) -> str:
    """Two eval sets of 12 prompts each, cut from the built-in held-out prompts."""
    from engine.tasks import resolve_path

    lines = Path(resolve_path("builtin:arithmetic/eval.jsonl")).read_text().splitlines()
    for name, part in (("first", lines[:12]), ("second", lines[12:24])):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    return f"eval.datasets={{first = '{tmp_path / 'first.jsonl'}', second = '{tmp_path / 'second.jsonl'}'}}"


@pytest.mark.slow
def test_two_step_run(tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    proc = launch(
        tmp_path,
        *SMALL,
        "rollout.num_rollout=2",
        "eval.interval=1",
        eval_sets(tmp_path),
        "eval.n_samples_per_eval_prompt=4",
        "eval.max_response_len=3",  # [rollout] has 8
        "eval.temperature=0.0",  # [rollout] has 1.0
        "inference.update_weight_buffer_size=65536",  # the weight push in many buckets
        "inference.colocate=true",  # engines sleep while the learner trains, the learner while they decode
        f"ckpt.save={save}",
        "tensorboard=true",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run directory: {tmp_path / 'run'}" in proc.stderr
    rows = records(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:  # eval at step 0, every step (interval 1) and at the end, for both sets
        for name in ("first", "second"):
            pass_at = [row[f"eval/{name}/pass@{k}"] for k in range(1, 5)]
            assert f"eval/{name}/pass@5" not in row and row[f"eval/{name}/samples"] == 12 * 4
            assert pass_at[0] == pytest.approx(row[f"eval/{name}/accuracy"], abs=1e-9)
            assert all(a <= b + 1e-9 for a, b in itertools.pairwise(pass_at))
            # greedy (eval.temperature 0): the 4 samples of a prompt agree, so pass@k is pass@1 for every k
            assert pass_at == pytest.approx([pass_at[0]] * 4, abs=1e-9)
            assert 0.0 < row[f"eval/{name}/response_len"] <= 3  # eval.max_response_len caps responses
            assert 0.0 <= row[f"eval/{name}/reward"] <= 1.0
    assert not any(k.startswith("eval/arithmetic/") for r in rows for k in r)
    first = rows[1]
    assert first["train/ppo_kl"] == 0.0
    assert [r.get("engine/sleeps") for r in rows[1:]] == [1, 2]
    assert first["rollout/samples"] == 16 and first["version"] == 1 and rows[2]["version"] == 2
    for key in (
        "rollout/reward_mean",
        "rollout/reward_std",
        "train/pg_loss",
        "train/entropy",
        "train/grad_norm",
        "train/lr",
        "time/train",
        "time/weight_sync",
        "time/step",
        "eval/first/accuracy",
        "eval/second/pass@4",
    ):
        assert key in rows[2], key
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["rollout"]["num_rollout"] == 2

    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(Path(rows[2]["ckpt/path"]) / "hf", dtype=torch.float32)
    initial = load_file(str(Path(config["ckpt"]["hf_checkpoint"]) / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(saved.state_dict()[name], initial[name])  # two RL steps moved the weights
    assert Path(rows[2]["ckpt/path"]) == save / "iter_0000002" and (save / "latest").read_text() == "2\n"


def test_bad_config_fails_before_start(tmp_path: Path) -> None:
    proc = launch(tmp_path, "rollout.batch_size=5", "rollout.global_batch_size=32")
    assert proc.returncode == 2
    assert "rollout.batch_size=5 x rollout.n_samples_per_prompt=8 = 40" in proc.stderr
    assert "(from command-line override" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_schedule_longer_than_the_run_is_a_config_error(tmp_path: Path) -> None:
    proc = launch(tmp_path, "rollout.num_rollout=3")
    assert proc.returncode == 2
    assert (
        "[optimizer] lr_warmup_iters: 5 warm-up steps do not fit in a cosine decay of 3 steps" in proc.stderr
    )


def test_malformed_data_names_file_and_line(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"input": [{"role": "user", "content": "1+1"}], "label": "2"})
    data.write_text(f"{good}\n{good}\n{{oops\n")
    proc = launch(tmp_path, f"rollout.prompt_data={data}")
    assert proc.returncode == 2
    assert f"{data}:3: invalid JSON" in proc.stderr


@pytest.mark.slow
def test_failing_reward_ends_the_run_with_its_error(tmp_path: Path) -> None:
    proc = launch(
        tmp_path,
        *SMALL,
        "rollout.num_rollout=2",
        "rollout.custom_rm_path=tests.rewards_custom:failing_reward",
    )
    assert proc.returncode == 1
    assert "boom" in proc.stderr and "failing_reward" in proc.stderr


@pytest.mark.slow
def test_ctrl_c_stops_cleanly(tmp_path: Path) -> None:
    cmd = command(tmp_path, *SMALL, "rollout.num_rollout=100000")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no training step within 300 s"
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr
    assert all(json.loads(line)["step"] >= 0 for line in metrics.read_text().splitlines())
