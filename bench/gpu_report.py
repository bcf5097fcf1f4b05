"""Reporting for bench/learner_gpu.py: kernel-time profile summaries, the markdown tables, the JSON.

Kernels are grouped by kind (matmul, attention, softmax, elementwise, copy/cast, ...) by name, so a
profile says where a training step's GPU time goes; `render` gives the tables every result file holds.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from bench.common import command, hardware, markdown_table

FORMULA = (
    "F = 6*N + 6*L*h*s + 6*h*V per token (training); N non-embedding parameters, L layers, "
    "h = heads*head_dim, s sequence length, V padded vocabulary; 6*L*h*s = attention scores and values "
    "with the causal half only (12*L*h*s for full attention); 6*h*V the output layer"
)


KINDS = [
    ("attention kernel", r"flash|fmha|attention|efficient_attention|cutlassF|cutlassB"),
    ("matmul", r"gemm|nvjet|xmma|cutlass|wgmma|sm90_|sm80_|splitk|cublas"),
    ("softmax", r"softmax"),
    ("nccl", r"nccl"),
    ("optimizer", r"multi_tensor|adam"),
    ("copy/cast", r"copy|cat_array|catarray|convert|fill"),
    ("reduction", r"reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|index|gather|scatter"),
]


def kind_of(kernel: str) -> str:
    low = kernel.lower()
    return next((k for k, pattern in KINDS if re.search(pattern, low)), "other")


def summarise_profile(prof: Any, wall_s: float, top: int = 10) -> dict[str, Any]:
    from torch.autograd import DeviceType

    def self_device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0))

    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and self_device_us(e) > 0]
    total_us = sum(self_device_us(e) for e in kernels) or 1.0
    kinds: dict[str, float] = {}
    for e in kernels:
        kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + self_device_us(e)
    ops = [e for e in events if e.device_type != DeviceType.CUDA and self_device_us(e) > 0]

    def rows(items: list[Any]) -> list[dict[str, Any]]:
        items = sorted(items, key=self_device_us, reverse=True)[:top]
        return [
            {
                "name": e.key[:120],
                "ms": round(self_device_us(e) / 1e3, 3),
                "share": round(self_device_us(e) / total_us, 4),
                "calls": e.count,
            }
            for e in items
        ]

    return {
        "kernel_ms": round(total_us / 1e3, 2),
        "step_wall_ms": round(wall_s * 1e3, 2),
        "gpu_busy": round(total_us / 1e6 / wall_s, 3),
        "by_kind": {k: round(v / total_us, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels": rows(kernels),
        "top_ops": rows(ops),
    }


HEADERS = [
    "shape",
    "attention",
    "variant",
    "seq len",
    "micro-batch",
    "accum",
    "tokens/step",
    "step ms",
    "tokens/s",
    "TFLOP/s",
    "MFU (measured matmul)",
    "MFU (nominal)",
    "peak GiB",
]


def table_row(r: dict) -> list[Any]:
    variant = r["variant"]
    if r.get("oom_micro_batches"):
        variant += f" (out of memory at micro-batch {', '.join(map(str, r['oom_micro_batches']))})"
    head = [r["shape"], r["attention"], variant, r["seq"]]
    if "error" in r:
        return [*head, r.get("micro_batch", "-"), r.get("grad_accum", "-"), "-", r["error"][:90], *"-----"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    return [
        *head,
        r["micro_batch"],
        r["grad_accum"],
        r["tokens_per_step"],
        f"{r['step_ms']:.0f}",
        f"{r['tokens_per_s']:.0f}",
        f"{r['model_tflops']:.1f}",
        pct(r["mfu_measured"]),
        pct(r["mfu_nominal"]),
        "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}",
    ]


def profile_lines(results: list[dict]) -> str:
    lines = []
    for r in results:
        p = r.get("profile")
        if not p:
            continue
        busy = p["kernel_ms"] / r["step_ms"] if r.get("step_ms") else p["gpu_busy"]
        kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(p["by_kind"].items())[:4])
        top = p["top_kernels"][0]["name"][:60] if p["top_kernels"] else "-"
        lines.append(
            f"| {r['shape']} | {r['attention']} | {r['variant']} | {r['seq']} | {busy:.2f} | "
            f"{kinds} | `{top}` |"
        )
    if not lines:
        return ""
    head = (
        "| shape | attention | variant | seq len | GPU busy | kernel time by kind | top kernel |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    return (
        "Profile of one step (CUDA kernel time of the profiled step; GPU busy = that kernel time / the "
        "timed step's wall time):\n\n"
    ) + "\n".join([head, *lines])


def ratios(results: list[dict]) -> list[dict]:
    """sdpa over local in tokens/s, per shape and sequence length (base variant)."""
    base = {
        (r["shape"], r["attention"], r["seq"]): r
        for r in results
        if r["variant"] == "base" and "tokens_per_s" in r
    }
    out = []
    for (shape, attn, seq), r in base.items():
        local = base.get((shape, "local", seq))
        if attn == "sdpa" and local:
            out.append(
                {
                    "shape": shape,
                    "seq": seq,
                    "speedup_sdpa_over_local": round(r["tokens_per_s"] / local["tokens_per_s"], 3),
                    "mfu_local": local["mfu_measured"],
                    "mfu_sdpa": r["mfu_measured"],
                    "peak_gib_local": local["peak_mem_gib"],
                    "peak_gib_sdpa": r["peak_mem_gib"],
                }
            )
    return out


def write(out_dir: Path, name: str, payload: dict[str, Any], table: str) -> Path:
    """<out>/<name>.json (with hardware and command) and <name>.md, as bench.common.write, GPU named."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hw = hardware()
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "command": command(), "hardware": hw}
    record.update(payload)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    machine = (
        f"{hw['gpu'] or 'no GPU'}; {hw['cpu']}, {hw['cores']} cores, {hw['memory_gib']} GiB; "
        f"torch {hw['torch']}"
    )
    header = f"# {name}\n\n{machine}; {record['date']}\n\n`{record['command']}`\n\n"
    (out_dir / f"{name}.md").write_text(header + table + "\n")
    return path


def render(results: list[dict], payload: dict[str, Any]) -> str:
    mm = payload["matmul"]
    peak = (
        f"bf16 matmul {mm['n']}^3 measured: {mm['best_tflops']:.0f} TFLOP/s (best of 20; median "
        f"{mm['median_tflops']:.0f}); nominal dense bf16 peak: {payload['nominal_tflops'] or '-'} TFLOP/s."
        if mm
        else "no GPU: no matmul rate, no MFU."
    )
    parts = [markdown_table(HEADERS, [table_row(r) for r in results]), "", peak, "", f"FLOPs: {FORMULA}."]
    if payload["sdpa_over_local"]:
        rows = [
            [
                x["shape"],
                x["seq"],
                f"{x['speedup_sdpa_over_local']:.2f}x",
                f"{100 * (x['mfu_local'] or 0):.1f}% -> {100 * (x['mfu_sdpa'] or 0):.1f}%",
                f"{x['peak_gib_local']} -> {x['peak_gib_sdpa']}",
            ]
            for x in payload["sdpa_over_local"]
        ]
        parts += [
            "",
            "sdpa against local attention (same run):",
            "",
            markdown_table(["shape", "seq len", "tokens/s ratio", "MFU", "peak GiB"], rows),
        ]
    prof = profile_lines(results)
    if prof:
        parts += ["", prof]
    return "\n".join(parts)
