"""Off-policy experiment: how staleness hurts learning and how much importance sampling wins back.

Trains the quickstart task (same data, model and seed) for every pair of max_staleness k and
correction in the grid, with engine and learner on one thread each so that generation runs ahead of
training and samples really are k versions old. Corrections: none (stale samples treated as on-policy),
tis (token-level truncated importance sampling, w = min(exp(old - rollout), 2)), mask (token-level
IcePop-style masking of tokens whose ratio leaves [0.5, 2]). Writes to bench/results:
offpolicy_cpu.png (training reward and held-out accuracy against step, final accuracy against k),
offpolicy_cpu.md (final accuracy table) and offpolicy_cpu.json (the raw per-step metrics of every run).

    python -m bench.offpolicy            # k in {0, 2, 8} x {none, tis}
    python -m bench.offpolicy --full     # k in {0, 1, 2, 4, 8} x {none, tis, mask}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import RESULTS, markdown_table, write

ROOT = Path(__file__).resolve().parents[1]
CORRECTIONS = {
    "none": ["algo.use_tis=false"],
    "tis": [
        "algo.use_tis=true",
        "algo.tis_mode=token_truncate",
        "algo.tis_clip=2.0",
        "algo.tis_clip_low=0.0",
    ],
    "mask": ["algo.use_tis=true", "algo.tis_mode=token_mask", "algo.tis_clip=2.0", "algo.tis_clip_low=0.5"],
}
COMMON = ["cluster.torch_threads=1", "eval.interval=25", "--no-progress"]


def run(k: int, correction: str, steps: int, out: Path) -> list[dict]:
    name = f"k{k}-{correction}"
    cmd = [
        sys.executable,
        "-m",
        "engine.launch",
        str(ROOT / "configs" / "quickstart.toml"),
        f"output_dir={out}",
        f"run_name={name}",
        f"rollout.num_rollout={steps}",
        f"rollout.max_staleness={k}",
        *CORRECTIONS[correction],
        *COMMON,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def smooth(values: list[float], width: int = 9) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def step(row: dict) -> int:
    return row["step"]


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right, final) = plt.subplots(1, 3, figsize=(17, 4.5))
    styles = {"none": "-", "tis": "--", "mask": ":"}
    ks = sorted({int(name.split("-")[0][1:]) for name in runs})
    colors = {k: plt.cm.viridis(i / max(1, len(ks) - 1)) for i, k in enumerate(ks)}
    for name, rows in runs.items():
        k, correction = int(name.split("-")[0][1:]), name.split("-")[1]
        train = [r for r in rows if "rollout/reward_mean" in r]
        label = f"k={k}, {correction}"
        left.plot(
            [r["step"] for r in train],
            smooth([r["rollout/reward_mean"] for r in train]),
            styles[correction],
            color=colors[k],
            label=label,
        )
        evals = [r for r in rows if "eval/arithmetic/accuracy" in r]
        right.plot(
            [r["step"] for r in evals],
            [r["eval/arithmetic/accuracy"] for r in evals],
            styles[correction],
            marker="o",
            color=colors[k],
            label=label,
        )
    for correction in styles:
        points = sorted(
            (
                int(name.split("-")[0][1:]),
                max((r for r in rows if "eval/arithmetic/accuracy" in r), key=step)[
                    "eval/arithmetic/accuracy"
                ],
            )
            for name, rows in runs.items()
            if name.split("-")[1] == correction
        )
        if points:
            final.plot(*zip(*points), styles[correction], marker="o", color="black", label=correction)
    final.set(
        title="held-out accuracy at the last step",
        xlabel="max_staleness k",
        ylabel="accuracy",
        xticks=ks,
    )
    final.legend(fontsize=8)
    left.set(title="training reward (moving average of 9 steps)", xlabel="step", ylabel="reward")
    right.set(title="held-out accuracy (200 prompts x 4 samples)", xlabel="step", ylabel="accuracy")
    for ax in (left, right, final):
        ax.grid(alpha=0.3)
    handles, labels = right.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=min(len(labels), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 5) // 6), 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="k in {0,1,2,4,8} x {none, tis, mask}")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    ks = [0, 1, 2, 4, 8] if args.full else [0, 2, 8]
    corrections = ["none", "tis", "mask"] if args.full else ["none", "tis"]
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            for correction in corrections:
                runs[f"k{k}-{correction}"] = run(k, correction, args.steps, Path(tmp))
                print(f"k={k} {correction}: done", flush=True)
    rows, summary = [], []
    for name, metrics in runs.items():
        k, correction = int(name.split("-")[0][1:]), name.split("-")[1]
        train = [r for r in metrics if "rollout/reward_mean" in r]
        evals = {r["step"]: r["eval/arithmetic/accuracy"] for r in metrics if "eval/arithmetic/accuracy" in r}
        last = train[-20:]
        item = {
            "max_staleness": k,
            "correction": correction,
            "eval_accuracy_start": evals[0],
            "eval_accuracy_end": evals[max(evals)],
            "eval_accuracy_best": max(evals.values()),
            "reward_last20": statistics.mean(r["rollout/reward_mean"] for r in last),
            "staleness_mean": statistics.mean(r["staleness/mean"] for r in train),
            "tis_clipfrac": statistics.mean(r.get("train/tis_clipfrac", 0.0) for r in train),
            "mismatch_kl": statistics.mean(r["train/mismatch_kl"] for r in train),
        }
        summary.append(item)
        rows.append(
            [
                k,
                correction,
                f"{item['staleness_mean']:.2f}",
                f"{item['eval_accuracy_start']:.3f}",
                f"{item['eval_accuracy_end']:.3f}",
                f"{item['eval_accuracy_best']:.3f}",
                f"{item['reward_last20']:.3f}",
                f"{item['mismatch_kl']:.4f}",
                f"{item['tis_clipfrac']:.3f}",
            ]
        )
    table = markdown_table(
        [
            "k",
            "correction",
            "staleness mean",
            "eval acc step 0",
            f"eval acc step {args.steps}",
            "eval acc best",
            "train reward (last 20)",
            "mismatch KL",
            "TIS clip/mask frac",
        ],
        rows,
    )
    print(table)
    plot(runs, RESULTS / "offpolicy_cpu.png")
    write(
        "offpolicy_cpu",
        {
            "steps": args.steps,
            "grid": {"k": ks, "correction": corrections},
            "summary": summary,
            "metrics": runs,
        },
        table + "\n\n![reward curves](offpolicy_cpu.png)\n",
    )


if __name__ == "__main__":
    main()
