"""Synchronous training keeps producing the very batches it produced when the reference was recorded.

The reference holds one fingerprint per step (groups, prompt and response tokens, rewards; see
engine.buffer.buffer.batch_digest) of a 4-step run on a tiny random Qwen2 with SGD and a length reward.
Regenerate it only when a change is meant to alter synchronous batches:
    python -m tests.test_sync_reference --write
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "data" / "sync_reference.toml"
REFERENCE = ROOT / "tests" / "data" / "sync_reference_digests.json"


def run_digests(tmp_path: Path) -> list[str]:
    ckpt = make_checkpoint(tmp_path / "model", "qwen2", seed=11)
    cmd = [
        sys.executable,
        "-m",
        "engine.launch",
        str(CONFIG),
        f"ckpt.hf_checkpoint={ckpt}",
        f"output_dir={tmp_path}",
        "run_name=ref",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    return [r["rollout/batch_digest"] for r in rows if "rollout/batch_digest" in r]


@pytest.mark.slow
def test_synchronous_batches_match_the_reference(tmp_path: Path) -> None:
    digests = run_digests(tmp_path)
    assert len(digests) == 4 and len(set(digests)) == 4
    assert digests == json.loads(REFERENCE.read_text())["digests"]


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        REFERENCE.write_text(json.dumps({"digests": run_digests(Path(tmp))}, indent=2) + "\n")
    print(f"wrote {REFERENCE}")
