"""The whole loop on one or two GPUs: samples/s and GPU busy fraction for sync, async and colocated training.

Runs `python -m engine.launch configs/quickstart.toml` (the arithmetic task: verifiable math rewards)
with the model replaced by a random Qwen2.5-0.5B-shaped checkpoint (bench/learner_worker.py) that uses
the task's character tokenizer, in bf16: 32 prompts x 8 samples = 256 samples per step, responses up to
--response-len tokens (a random model rarely stops early). On one GPU the learner (Megatron, distributed
optimizer) and the embedded engine share it and weights move by CUDA IPC; with two GPUs visible they
take one each (disaggregated) and weights move by NCCL broadcast (engine/gpu_plan.py decides both).
Modes: sync (max_staleness 0), async k = 1 and k = 2, and colocated (sync; the engine releases its
caches while the learner trains, the learner offloads its optimizer state while the engine decodes).
Each mode also reports the bound the sync run sets for it: async can at best hide the shorter of rollout
and training, so (rollout + train) / max(rollout, train) of the sync run is the most it can gain.

samples/s counts the steps after the first --skip (warm-up: compilation, allocator growth); GPU busy is
nvidia-smi's utilization.gpu (share of time a kernel was running), sampled every 100 ms over the same
steps (the mean over the GPUs, and each GPU's). Per-phase memory comes from the run's memory/* metrics
(colocated mode). With --trl, TRL's GRPOTrainer runs first on the same checkpoint, task and sample count
(bench/trl_gpu.py), and every mode is reported as its samples/s over TRL's, measured in the same run.

    python -m bench.e2e_gpu [--modes sync async1 async2 colocated] [--steps 8] [--trl] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, markdown_table
from bench.gpu_report import write
from bench.learner_gpu import gpu_name

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "sync": ["rollout.max_staleness=0"],
    "async1": ["rollout.max_staleness=1"],
    "async2": ["rollout.max_staleness=2"],
    "colocated": ["rollout.max_staleness=0", "inference.colocate=true"],
}


class GpuSampler:
    """nvidia-smi utilization.gpu of every GPU every 100 ms in a background thread, with wall-clock stamps."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, float]] = []
        self._proc: subprocess.Popen | None = None
        if shutil.which("nvidia-smi"):
            query = ["--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible:  # nvidia-smi ignores it: read only the GPUs this run can use
                query += ["-i", visible]
            cmd = ["nvidia-smi", *query]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                index, util = line.split(",")[:2]
                self.samples.append((time.time(), int(index), float(util)))
            except ValueError:
                continue

    def per_gpu(self, start: float, end: float) -> dict[int, float]:
        """Each GPU's mean busy fraction over [start, end]."""
        by_gpu: dict[int, list[float]] = {}
        for t, index, util in self.samples:
            if start <= t <= end:
                by_gpu.setdefault(index, []).append(util / 100)
        return {i: statistics.mean(v) for i, v in sorted(by_gpu.items())}

    def mean(self, start: float, end: float) -> float | None:
        per = self.per_gpu(start, end)
        return statistics.mean(per.values()) if per else None

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def make_model(shape: str, root: Path) -> Path:
    from bench.learner_worker import write_checkpoint
    from engine.tasks.char_tokenizer import build_char_tokenizer

    write_checkpoint(shape, root)
    build_char_tokenizer(root)
    return root


def run(mode: str, model: Path, out: Path, args: argparse.Namespace, sampler: GpuSampler) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "engine.launch", str(ROOT / "configs" / "quickstart.toml"),
        f"output_dir={out}", f"run_name={mode}", f"ckpt.hf_checkpoint={model}",
        f"rollout.num_rollout={args.steps}", f"rollout.max_response_len={args.response_len}",
        "rollout.batch_size=32", "rollout.n_samples_per_prompt=8",
        "model.params_dtype=bfloat16", "inference.dtype=bfloat16", "inference.max_batch_size=256",
        f"perf.micro_batch_size={args.micro_batch}", f"inference.context_length={args.context_length}",
        "optimizer.lr=1e-6", "optimizer.min_lr=1e-7", "optimizer.lr_warmup_iters=0",
        "eval.datasets={}", "eval.interval=0", "--no-progress", *MODES[mode], *args.extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        return {"mode": mode, "error": proc.stderr[-3000:]}
    rows = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > 0]
    timed = rows[args.skip :]
    wall = sum(r["time/step"] for r in timed)
    end = timed[-1]["wall_time"]  # the span of the timed steps, on the clock the GPU samples carry
    start = end - wall
    samples = sum(r["rollout/samples"] for r in timed)
    tokens = sum(r["rollout/response_len_mean"] * r["rollout/samples"] for r in timed)
    memory = {k: max(r.get(k, 0.0) for r in timed) for k in timed[-1] if k.startswith("memory/")}
    return {
        "mode": mode,
        "steps_timed": len(timed),
        "samples": samples,
        "wall_s": round(wall, 2),
        "samples_per_s": round(samples / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "gpu_busy": sampler.mean(start, end),
        "gpu_busy_per_gpu": {str(i): round(u, 3) for i, u in sampler.per_gpu(start, end).items()},
        "train_s": round(sum(r["time/train"] for r in timed), 2),
        "rollout_wait_s": round(sum(r["time/rollout_wait"] for r in timed), 2),
        "weight_sync_s": round(sum(r["time/weight_sync"] for r in timed), 3),
        "engine_busy_s": round(timed[-1]["engine/busy_s"] - rows[args.skip - 1]["engine/busy_s"], 2)
        if args.skip
        else round(timed[-1]["engine/busy_s"], 2),
        "staleness_mean": statistics.mean(r["staleness/mean"] for r in timed),
        "memory_gib": memory,
    }


def run_trl(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """TRL's GRPOTrainer on the same checkpoint (bench/trl_gpu.py, in a process of its own)."""
    cmd = [sys.executable, "-m", "bench.trl_gpu", f"--model={model}", f"--steps={args.trl_steps}"]
    cmd += ["--skip=1", f"--response-len={args.response_len}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        return {"error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the figures")
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=64, help="perf.micro_batch_size")
    parser.add_argument("--context-length", type=int, default=512, help="inference.context_length")
    parser.add_argument("--extra", nargs="*", default=[], help="more config overrides for every mode")
    parser.add_argument("--trl", action="store_true", help="also TRL's GRPOTrainer (bench/trl_gpu.py)")
    parser.add_argument("--trl-steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix of the results' file name")
    args = parser.parse_args()

    name = gpu_name()
    gpus = gpu_count()
    placement = "learner and engine on one GPU" if gpus < 2 else "learner and engine on a GPU each"
    payload: dict[str, Any] = {"gpu": name, "gpus": gpus, "placement": placement}
    payload["settings"] = {k: str(v) for k, v in vars(args).items()}
    payload["results"] = []
    rows: list[list[Any]] = []
    table = "(no mode ran)"
    sampler = GpuSampler()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = make_model(args.shape, Path(tmp) / "model")
            if args.trl:
                payload["trl"] = run_trl(model, args)
                print(json.dumps(payload["trl"]), flush=True)
            for mode in args.modes:
                r = run(mode, model, Path(tmp) / "runs", args, sampler)
                payload["results"].append(r)
                print(json.dumps(r)[:3000], flush=True)
                if "error" in r:
                    continue
                busy = r["gpu_busy"]
                rows.append(
                    [mode, r["samples_per_s"], r["tokens_per_s"], None if busy is None else round(busy, 3),
                     r["train_s"], r["rollout_wait_s"], r["weight_sync_s"]]
                )  # fmt: skip
                base = next((x for x in payload["results"] if x["mode"] == "sync" and "error" not in x), None)
                if base:
                    r["speedup_over_sync"] = round(r["samples_per_s"] / base["samples_per_s"], 3)
                    rollout, train = base["rollout_wait_s"], base["train_s"]
                    r["async_bound"] = round((rollout + train) / max(rollout, train, 1e-9), 3)
                rows[-1] += [r.get("speedup_over_sync"), r.get("async_bound")]
                trl = payload.get("trl", {}).get("samples_per_s")
                if trl:
                    r["over_trl"] = round(r["samples_per_s"] / trl, 2)
                rows[-1].append(r.get("over_trl"))
                table = markdown_table(
                    [
                        "mode",
                        "samples/s",
                        "tokens/s",
                        "GPU busy",
                        "train s",
                        "learner wait s",
                        "push s",
                        "/ sync",
                        "bound",
                        "/ TRL",
                    ],
                    rows,
                )
                suffix = f"_x{gpus}" if gpus > 1 else ""
                write(
                    args.out, f"e2e_{(name or 'cpu').split()[-1].lower()}{suffix}{args.tag}", payload, table
                )
    finally:
        sampler.stop()
    print(table)


if __name__ == "__main__":
    main()
