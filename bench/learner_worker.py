"""Training throughput and MFU of the learner itself on one GPU: LearnerWorker ranks driven by LearnerGroup.

bench/learner_gpu.py measures the model and loss in a bare loop; this drives the learner as a run does:
a rollout of Samples (prompt 128 tokens, response seq - 128, groups of 8, rewards 0/1) goes to a
LearnerGroup of one CUDA rank, which builds micro-batches, runs the GRPO step (log-probs, advantages,
clipped policy loss, entropy metric) through Megatron's DistributedDataParallel and distributed optimizer
(bf16 weights, fp32 master weights and gradients) and returns its metrics. The model is a random
Qwen2.5-shaped HF checkpoint written on the spot (no download).

Variants (all bf16, SDPA attention): "padded" (micro_batch_size = micro_tokens / seq), "packed"
(use_dynamic_batch_size, max_tokens_per_gpu = micro_tokens), each also with perf.torch_compile.
Each does --warmup untimed train calls, then --steps timed ones (one optimizer step on step_tokens tokens
each); the median wall time of the call (Ray call included) gives tokens/s; MFU uses bench/learner_gpu.py's
FLOPs per token and the bf16 matmul rate measured in the same run, per GPU.

With --tp 1 2, each variant also runs with tensor parallel size 2 (two ranks, a GPU each, NCCL): the
first step's metrics (loss, token entropy, gradient norm) come from the same weights and samples before
any update, so they are reported next to TP = 1's as the check that the sharded model computes the same
thing (the GRPO loss itself is 0 there: advantages sum to zero per group and the ratio is 1).

    python -m bench.learner_worker [--shapes 0.5b 1.5b] [--seq 2048] [--variants ...] [--tp 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import RESULTS, markdown_table
from bench.gpu_report import write
from bench.learner_gpu import flops_per_token, gpu_name, hf_config, matmul_tflops, nominal_tflops

VARIANTS = ("padded", "padded + compiled", "packed", "packed + compiled")


def write_checkpoint(shape: str, root: Path) -> tuple[Any, int]:
    """A random bf16 HF checkpoint of the shape (normal(0, 0.02), norms 1, biases 0); returns the HF config
    and the number of non-embedding parameters."""
    from safetensors.torch import save_file
    from transformers import Qwen2ForCausalLM

    config = hf_config(shape)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    state, non_embedding = {}, 0
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        elif p.ndim == 1:
            t = torch.zeros(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
        state[name] = t
        if "embed_tokens" not in name and "lm_head" not in name:
            non_embedding += p.numel()
    root.mkdir(parents=True, exist_ok=True)
    save_file(state, str(root / "model.safetensors"))
    config.save_pretrained(root)
    return config, non_embedding


def rollout(num: int, seq: int, vocab: int, prompt: int = 128, group: int = 8) -> list[Any]:
    from engine.wire import Sample

    rng = np.random.default_rng(0)
    out = []
    for k in range(num):
        response = seq - prompt
        out.append(
            Sample.build(
                prompt_ids=rng.integers(1, vocab, prompt).tolist(),
                response_ids=rng.integers(1, vocab, response).tolist(),
                rollout_logprobs=[-1.0] * response,
                versions=[0] * response,
                group_id=k // group,
                index=k % group,
                group_size=group,
                prompt_index=k // group,
                reward=float(k % 2),
                status="completed",
            )
        )
    return out


def perf_for(variant: str, seq: int, micro_tokens: int, tp: int = 1) -> Any:
    from engine.learner.config import PerfConfig

    common = {"torch_compile": "compiled" in variant, "tensor_model_parallel_size": tp}
    if variant.startswith("padded"):
        return PerfConfig(micro_batch_size=max(1, micro_tokens // seq), **common)
    return PerfConfig(use_dynamic_batch_size=True, max_tokens_per_gpu=micro_tokens, **common)


def bench_spec(ckpt: Path, perf: Any, total_steps: int) -> Any:
    """The benchmarks' learner: bf16 on a GPU (float32 on the CPU), GRPO, Adam at lr 1e-6, seed 0."""
    from engine.learner.config import AlgoConfig, CkptConfig, LearnerSpec, ModelConfig, OptimizerConfig

    return LearnerSpec(
        model=ModelConfig(params_dtype="bfloat16" if torch.cuda.is_available() else "float32"),
        ckpt=CkptConfig(hf_checkpoint=str(ckpt)),
        perf=perf,
        algo=AlgoConfig(),
        optimizer=OptimizerConfig(lr=1e-6),
        temperature=1.0,
        total_steps=total_steps,
        seed=0,
        threads=4,
    )


def run_variant(
    ckpt: Path, variant: str, args: argparse.Namespace, samples_ref: Any, n: int, tp: int = 1
) -> dict:
    from engine.learner.group import LearnerGroup

    spec = bench_spec(ckpt, perf_for(variant, args.seq, args.micro_tokens, tp), args.warmup + args.steps)
    t0 = time.perf_counter()
    group = LearnerGroup(tp, spec)
    out: dict[str, Any] = {"variant": variant, "build_s": round(time.perf_counter() - t0, 1), **group.info[0]}
    try:
        for k in range(max(1, args.warmup)):
            first = group.train(samples_ref, 1)[0]
            if k == 0:  # before any update: TP = 1 and TP = 2 must agree here
                out["first_step"] = {k: first[k] for k in ("loss", "entropy", "grad_norm") if k in first}
        group._all("memory", True)
        times, metrics = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            metrics.append(group.train(samples_ref, 1)[0])
            times.append(time.perf_counter() - t0)
        out["memory"] = group._all("memory")[0]
    finally:
        group.shutdown()
    step_s = statistics.median(times)
    out.update(
        step_s=round(step_s, 4),
        step_s_all=[round(t, 4) for t in times],
        train_time_s=round(statistics.median(m["train_time"] for m in metrics), 4),
        tokens_per_s=round(n * args.seq / step_s, 1),
        loss=metrics[-1]["loss"],
        grad_norm=metrics[-1]["grad_norm"],
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["0.5b", "1.5b"])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--step-tokens", type=int, default=32768)
    parser.add_argument("--micro-tokens", type=int, default=16384)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--tp", type=int, nargs="+", default=[1], help="tensor parallel sizes (a GPU per rank)"
    )
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", default="", help="suffix of the results' file name (e.g. _tp2)")
    args = parser.parse_args()

    import ray

    from engine.learner import hf_bridge

    name = gpu_name()
    part = re.search(r"[A-Z]\d{2,4}", name or "")
    out = f"learner_worker_{part.group(0).lower() if part else 'cpu'}{args.tag}"
    mm = matmul_tflops()
    peaks = {"measured": mm["best_tflops"] if mm else None, "nominal": nominal_tflops(name)}
    print(f"device: {name or 'cpu'}; matmul: {mm}", flush=True)
    payload: dict[str, Any] = {"gpu": name, "matmul": mm, "nominal_tflops": peaks["nominal"], "results": []}
    rows: list[list[Any]] = []
    table = "(no variant ran)"
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        for shape in args.shapes:
            with tempfile.TemporaryDirectory() as tmp:
                config, non_embedding = write_checkpoint(shape, Path(tmp))
                s = hf_bridge.shape_of(config)
                flops = flops_per_token(s, args.seq, non_embedding)
                n = max(1, args.step_tokens // args.seq)
                samples_ref = ray.put(rollout(n, args.seq, config.vocab_size))
                for variant, tp in [(v, t) for v in args.variants for t in args.tp]:
                    r = {"shape": shape, "seq": args.seq, "samples_per_step": n, "tp": tp}
                    try:
                        r.update(run_variant(Path(tmp), variant, args, samples_ref, n, tp))
                    except Exception as exc:  # recorded in the results, the other variants still run
                        r["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
                        payload["results"].append(r)
                        print(json.dumps(r), flush=True)
                        write(args.out, out, payload, table)
                        continue
                    tflops = r["tokens_per_s"] * flops["total"] / 1e12 / tp  # per GPU
                    r["model_tflops"] = round(tflops, 1)
                    r["mfu_measured"] = round(tflops / peaks["measured"], 4) if peaks["measured"] else None
                    r["mfu_nominal"] = round(tflops / peaks["nominal"], 4) if peaks["nominal"] else None
                    base = next(
                        (x for x in payload["results"] if x["shape"] == shape and x["variant"] == variant),
                        None,
                    )
                    if tp > 1 and base is not None and base["tp"] == 1:
                        r["first_step_rel_diff_vs_tp1"] = {
                            k: abs(v - base["first_step"][k]) / max(abs(base["first_step"][k]), 1e-12)
                            for k, v in r["first_step"].items()
                        }
                    payload["results"].append(r)
                    print(json.dumps(r), flush=True)
                    peak = r.get("memory", {}).get("peak_gib")
                    rows.append(
                        [
                            shape,
                            variant,
                            tp,
                            r["tokens_per_s"],
                            r["model_tflops"],
                            r["mfu_measured"],
                            r["mfu_nominal"],
                            r["step_s"],
                            None if peak is None else round(peak, 1),
                            f"{r['first_step'].get('entropy', float('nan')):.6g}",
                            f"{r['first_step']['grad_norm']:.6g}",
                        ]
                    )
                    table = markdown_table(
                        [
                            "shape",
                            "variant",
                            "TP",
                            "tokens/s",
                            "TFLOP/s / GPU",
                            "MFU (measured)",
                            "MFU (nominal)",
                            "step s",
                            "peak GiB",
                            "first-step entropy",
                            "first-step grad norm",
                        ],
                        rows,
                    )
                    write(args.out, out, payload, table)
    finally:
        ray.shutdown()
    print(table)


if __name__ == "__main__":
    main()
