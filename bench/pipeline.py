"""Synchronous against asynchronous training on the CPU quickstart, at equal sample counts.

Runs `python -m engine.launch configs/quickstart.toml` for max_staleness k in {0, 1, 2} with the same
number of steps and samples, engine and learner each held to one thread pinned to a core of its own,
and the engine's batch sized so that rollout and training take about the same time in the synchronous
run. Reports wall time over the training steps, samples/s, the speedup over k = 0, and how long each
side waited: the learner for batches, the engine idle, the producer for capacity. Each k runs
--repeats times, interleaved with the others, and the run of median wall time is kept.

    python -m bench.pipeline [--steps 60] [--repeats 2] [--engine-batch 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import markdown_table, write

ROOT = Path(__file__).resolve().parents[1]
ENGINE_BATCH = 256  # sequences per engine batch (the default): rollout and training then take about as long
COMMON = [
    "cluster.torch_threads=1",
    "cluster.pin_cores=true",
    "optimizer.lr_warmup_iters=0",
    "eval.datasets={}",
    "eval.interval=0",
    "--no-progress",
]


def run(k: int, steps: int, out: Path, overrides: list[str], repeat: int) -> dict:
    name = f"k{k}-r{repeat}"
    cmd = [
        sys.executable,
        "-m",
        "engine.launch",
        str(ROOT / "configs" / "quickstart.toml"),
        f"output_dir={out}",
        f"run_name={name}",
        f"rollout.num_rollout={steps}",
        f"rollout.max_staleness={k}",
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    wall = sum(r["time/step"] for r in rows)
    samples = sum(r["rollout/samples"] for r in rows)
    last = rows[-1]
    return {
        "max_staleness": k,
        "steps": len(rows),
        "samples": samples,
        "wall_s": wall,
        "samples_per_s": samples / wall,
        "step_s_median": statistics.median(r["time/step"] for r in rows),
        "learner_busy_s": sum(r["time/train"] for r in rows),
        "learner_wait_s": sum(r["time/rollout_wait"] for r in rows),
        "weight_push_s": sum(r["time/weight_sync"] for r in rows),
        "engine_busy_s": last["engine/busy_s"],
        "engine_idle_s": wall - last["engine/busy_s"],
        "producer_capacity_wait_s": last["producer/capacity_wait_s"],
        "staleness_mean": statistics.mean(r["staleness/mean"] for r in rows),
        "staleness_max": max(r["staleness/max"] for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2, help="runs per k, interleaved; the median is kept")
    parser.add_argument("--engine-batch", type=int, default=ENGINE_BATCH, help="inference.max_batch_size")
    args = parser.parse_args()
    overrides = [*COMMON, f"inference.max_batch_size={args.engine_batch}"]
    runs: dict[int, list[dict]] = {0: [], 1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for k, done in runs.items():
                done.append(run(k, args.steps, Path(tmp), overrides, repeat))
                print(
                    {key: round(v, 3) if isinstance(v, float) else v for key, v in done[-1].items()},
                    flush=True,
                )
    results = [sorted(rs, key=lambda r: r["wall_s"])[len(rs) // 2] for rs in runs.values()]
    base = results[0]["wall_s"]
    rows = [
        [
            r["max_staleness"],
            int(r["samples"]),
            f"{r['wall_s']:.1f}",
            f"{r['samples_per_s']:.0f}",
            f"{base / r['wall_s']:.2f}x",
            f"{r['learner_busy_s']:.1f}",
            f"{r['learner_wait_s']:.1f}",
            f"{r['engine_idle_s']:.1f}",
            f"{r['producer_capacity_wait_s']:.1f}",
            f"{r['staleness_mean']:.2f} / {r['staleness_max']}",
        ]
        for r in results
    ]
    headers = [
        "k",
        "samples",
        "wall s",
        "samples/s",
        "speedup",
        "learner busy s",
        "learner waits s",
        "engine idle s",
        "producer waits s",
        "staleness mean / max",
    ]
    sync = results[0]
    balance = (
        f"\nSynchronous step: rollout (the learner waiting) {sync['learner_wait_s'] / sync['steps']:.3f} s, "
        f"training {sync['learner_busy_s'] / sync['steps']:.3f} s.\n"
    )
    table = markdown_table(headers, rows) + "\n" + balance
    print(table)
    payload = {
        "config": "configs/quickstart.toml",
        "overrides": overrides,
        "results": results,
        "all_runs": {str(k): rs for k, rs in runs.items()},
        "speedup_k1": base / results[1]["wall_s"],
        "speedup_k2": base / results[2]["wall_s"],
        "target_speedup_k2": 1.5,
    }
    write("pipeline_cpu", payload, table)


if __name__ == "__main__":
    main()
