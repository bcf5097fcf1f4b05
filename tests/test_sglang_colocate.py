"""A colocated run with inference.backend = "sglang": the run starts its server (the stand-in, through
inference.server_launcher) next to the learner, releases its memory before every training step, gives
it the trained weights by /update_weights_from_tensor (shared-memory tensors on the CPU), and resumes it;
the server generates only while resumed and ends with the learner's weights."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.sglang_fixtures import LAUNCHER, ROOT
from tests.test_launch import SMALL, records

QUICKSTART = ROOT / "configs" / "quickstart.toml"
STEPS = 3


def digest(tensor: torch.Tensor) -> str:
    """As the stand-in server digests its parameters."""
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def per_step(events: list[list]) -> list[list[list]]:
    """The events cut at each release (the first part: before the first training step)."""
    parts: list[list[list]] = [[]]
    for event in events:
        if event[0] == "pause" and event[1] == "abort":
            parts.append([])
        parts[-1].append(event)
    return parts


@pytest.mark.slow
def test_colocated_run_releases_trains_loads_by_tensor_and_resumes(tmp_path: Path) -> None:
    log = tmp_path / "server_events.jsonl"
    launcher = ", ".join(f"'{w}'" for w in [*LAUNCHER, "--event-log", str(log)])
    proc = subprocess.run(
        [sys.executable, "-m", "engine.launch", str(QUICKSTART), f"output_dir={tmp_path}", "run_name=run",
         *SMALL, f"rollout.num_rollout={STEPS}", "eval.interval=0", "eval.datasets={}",
         "inference.backend=sglang", "inference.colocate=true", f"inference.server_launcher=[{launcher}]",
         "inference.sglang={device='cpu'}", "inference.update_weight_buffer_size=65536",
         f"ckpt.save={tmp_path / 'save'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = records(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and rows[-1]["version"] == STEPS
    events = [json.loads(line) for line in log.read_text().splitlines()]
    before, *steps = per_step(events)
    assert len(steps) == STEPS
    assert ["generate"] in before and not any(e[0] in ("release", "update_tensor") for e in before)
    digests = []
    for version, part in enumerate(steps, start=1):
        control = [e[:2] for e in part if not e[0].startswith("generate")]
        loads = [e for e in control if e[0] == "update_tensor"]
        assert loads and loads[-1] == ["update_tensor", str(version)] and len(loads) > 1  # bucket by bucket
        assert control == [
            ["pause", "abort"],
            ["release", ["cuda_graph", "kv_cache", "weights"]],  # then the learner trains
            ["resume", ["weights"]],
            *loads,  # the trained weights, by tensor
            ["resume", ["cuda_graph", "kv_cache"]],
            ["continue"],
        ]
        # generation only after the resume: none between the release and the continue
        last_control = max(i for i, e in enumerate(part) if not e[0].startswith("generate"))
        assert all(not e[0].startswith("generate") for e in part[:last_control])
        if version < STEPS:
            assert ["generate"] in part[last_control:]  # the next batch was generated on the new weights
        digests.append(next(e[2] for e in part if e[:2] == ["update_tensor", str(version)]))
    assert not any(e[0] in ("update_distributed", "generate_refused", "release_refused") for e in events)
    assert digests[0] != digests[1] != digests[2]  # each step's training changed the weights
    # The server ends with the learner's weights: those of the final checkpoint, bit for bit.
    saved = load_file(str(tmp_path / "save" / f"iter_{STEPS:07d}" / "hf" / "model.safetensors"))
    assert set(saved) <= set(digests[-1])
    assert {name: digest(t) for name, t in saved.items()} == {name: digests[-1][name] for name in saved}
