"""Learner training throughput and MFU on one GPU: Megatron GPTModels of the Qwen2.5-0.5B/1.5B shapes.

Builds the model as the learner does (hf_bridge.shape_of, transformer_config, build_gpt_model) from a
transformers Qwen2Config made on the spot (no download), in bf16 with random weights (normal(0, 0.02),
norms 1, biases 0), wraps it in Megatron's DistributedDataParallel with Megatron's distributed optimizer
(Adam, bf16, fp32 main weights and gradients) on a world of one process (NCCL, TP = 1), and times full
training steps: forward, the learner's loss over the vocabulary (engine.learner.loss.token_logprobs:
fp32 log-softmax of the logits, the targets' log-probs and the entropy), backward, gradient sync and
the optimizer step. Every step has the same number of tokens at every sequence length (micro-batch =
micro-tokens / seq, gradient accumulation = step-tokens / micro-tokens); a micro-batch that runs out of
memory is halved (accumulation doubled) and retried.

After one untimed step, one step runs under torch.profiler: its CUDA kernels, grouped by kernel, by op
and by kind (matmul, attention, softmax, elementwise, ...), name the bottleneck; the top 10 go into the
JSON. Then `--warmup` steps, then `--steps` timed steps (the median is reported), each between
torch.cuda.synchronize calls. Peak memory is torch.cuda.max_memory_allocated over all of them.

Model FLOPs per token of a training step (forward + backward = 3 x forward):

    F = 6 N + 6 L h s + 6 h V

  N  non-embedding parameters (attention, MLP, norms, biases; the word embedding and output layer are
     not counted here), L layers, h = heads x head_dim (= hidden for these shapes), s sequence length,
     V vocabulary (padded, 151936 here). 6 L h s is the attention scores (QK^T) and values (PV): 12 L h s
     for full attention, halved because causal attention needs only the lower triangle; 6 h V is the
     output layer (logits). The full-attention count (12 L h s) is in the JSON too.

MFU = tokens/s x F / the GPU's bf16 dense matmul rate measured in the same run (8192 x 8192 x 8192
torch.matmul in bf16, best of 20), and, for reference, / the nominal dense bf16 peak of the part.

--levers then tries the usual next levers on one shape and sequence length (larger micro-batches,
Megatron's fusion flags, Megatron's own cross-entropy, a compiled loss) and reports MFU for each;
a lever the installed software cannot run (no Transformer Engine or Apex) is reported as unavailable.

    python -m bench.learner_gpu [--attention local sdpa] [--shapes 0.5b 1.5b] [--seqs 1024 2048 4096]
                                [--levers] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import inspect
import json
import re
import statistics
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench.common import RESULTS
from bench.gpu_report import FORMULA, ratios, render, summarise_profile, write

# Qwen2.5 shapes (config.json of the released checkpoints); "tiny" checks the code path on a CPU.
SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "1.5b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=1024,
        tie_word_embeddings=True,
    ),
}
# Dense bf16 tensor-core peak from the vendors' datasheets (SXM parts), for reference only.
NOMINAL_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def hf_config(shape: str) -> Any:
    from transformers import Qwen2Config

    config = Qwen2Config(
        **SHAPES[shape],
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        hidden_act="silu",
    )
    config.architectures = ["Qwen2ForCausalLM"]
    return config


@dataclasses.dataclass
class Case:
    shape: str
    attention: str
    seq: int
    micro_tokens: int
    step_tokens: int
    variant: str = "base"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    loss: str = "logprob"  # "logprob": the learner's token_logprobs; "labels": Megatron's cross-entropy
    compile_loss: bool = False
    compile_layers: bool = False  # torch.compile each transformer layer (fuses norms, RoPE, SwiGLU, casts)


# --- set-up ----------------------------------------------------------------------------------------


def init_distributed(seed: int) -> torch.device:
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            init_method="tcp://127.0.0.1:29517",
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=300),
        )
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(tensor_model_parallel_size=1)
    torch.manual_seed(seed)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return torch.device("cuda", 0)
    from engine.learner.device_shim import install_cpu_shim

    install_cpu_shim(seed, 0)
    return torch.device("cpu")


def attention_backends() -> list[str]:
    """The attention backends today's hf_bridge.build_gpt_model can build."""
    from engine.learner import hf_bridge

    if "attention" in inspect.signature(hf_bridge.build_gpt_model).parameters:
        return list(getattr(hf_bridge, "ATTENTION_BACKENDS", ("local", "sdpa")))
    return ["local"]


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def nominal_tflops(name: str | None) -> float | None:
    if not name or "PCIE" in name.upper():
        return None
    return next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in name), None)


def matmul_tflops(n: int = 8192, repeats: int = 20) -> dict[str, float] | None:
    """bf16 dense matmul rate on random data: the best and median of `repeats` timed products."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    flops = 2 * n**3
    del a, b
    torch.cuda.empty_cache()
    return {
        "n": n,
        "best_tflops": flops / min(times) / 1e12,
        "median_tflops": flops / statistics.median(times) / 1e12,
    }


@torch.no_grad()
def init_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """Random initialisation (the bridge builds with perform_initialization=False: memory is empty)."""
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            p.fill_(1.0)
        elif p.ndim == 1:
            p.zero_()
        else:
            p.normal_(0.0, std)


def flops_per_token(s: Any, seq: int, non_embedding: int) -> dict[str, float]:
    attn_width = s.heads * s.head_dim
    dense = 6 * non_embedding
    attention_full = 12 * s.layers * attn_width * seq
    output = 6 * s.hidden * s.padded_vocab
    return {
        "dense_6N": float(dense),
        "attention_causal": attention_full / 2,
        "attention_full": float(attention_full),
        "output_layer": float(output),
        "total": dense + attention_full / 2 + output,
        "total_full_attention": float(dense + attention_full + output),
    }


# --- profile summary -------------------------------------------------------------------------------

# --- one case --------------------------------------------------------------------------------------


class Unavailable(Exception):
    """The installed software cannot build this configuration."""


class CPUAdam:
    """torch AdamW with the Megatron optimizer's zero_grad/step interface, for a CPU check of the code."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-6)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> tuple[bool, None, None]:
        for p in self.params:
            p.grad = p.main_grad.to(p.dtype)
        self.opt.step()
        return True, None, None


def build(case: Case, device: torch.device) -> tuple[Any, Any, Any, int]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from engine.learner import hf_bridge

    hf = hf_config(case.shape)
    s = hf_bridge.shape_of(hf)
    tconfig = hf_bridge.transformer_config(hf, s, tp=1, params_dtype=torch.bfloat16)
    extra = {"attention": case.attention} if len(attention_backends()) > 1 else {}
    try:  # a flag the installed software cannot run fails here (no Transformer Engine, no Apex)
        if case.overrides:
            tconfig = dataclasses.replace(tconfig, **case.overrides)
        model = hf_bridge.build_gpt_model(hf, s, tconfig, **extra)
    except (ValueError, RuntimeError, AssertionError) as e:
        raise Unavailable(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    # Every parameter in the training dtype, as Megatron's Float16Module does: the local spec builds its
    # RMSNorm weights in float32, and a float32 weight under bf16 input keeps torch off its fused kernel.
    model = model.to(device=device, dtype=tconfig.params_dtype)
    init_weights(model)
    if case.compile_layers:
        for layer in model.decoder.layers:
            layer.compile(dynamic=False)
    non_embedding = sum(
        p.numel()
        for n, p in model.named_parameters()
        if not n.startswith("embedding.") and not n.startswith("output_layer.")
    )
    ddp = DistributedDataParallel(
        config=tconfig,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
        ),
        module=model,
    )
    if device.type != "cuda":  # Megatron's mixed-precision optimizers need CUDA: a code-path check only
        return ddp, CPUAdam(model), s, non_embedding
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-6,
            min_lr=1e-6,
            weight_decay=0.01,
            bf16=True,
            params_dtype=torch.bfloat16,
            use_distributed_optimizer=True,
            clip_grad=1.0,
        ),
        [ddp],
    )
    return ddp, optimizer, s, non_embedding


def make_loss(case: Case, s: Any):
    from engine.learner.loss import token_logprobs

    def logprob_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # the entropy is a metric in the learner (no gradient through it), computed all the same
        logp, _ = token_logprobs(logits[..., : s.vocab], targets, 1.0, with_entropy=True)
        return -logp.mean()

    if case.compile_loss:
        return torch.compile(logprob_loss)
    return logprob_loss


def run_case(case: Case, args: argparse.Namespace, device: torch.device, peaks: dict[str, Any]) -> dict:
    from megatron.core import parallel_state as mpu

    out: dict[str, Any] = dataclasses.asdict(case)
    mb = max(1, case.micro_tokens // case.seq)
    accum = max(1, case.step_tokens // (mb * case.seq))
    out.update(micro_batch=mb, grad_accum=accum, tokens_per_step=mb * accum * case.seq)
    cuda = device.type == "cuda"
    mpu.destroy_global_memory_buffer()
    mpu._set_global_memory_buffer()
    if cuda:
        out["mem_before_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    try:
        ddp, optimizer, s, non_embedding = build(case, device)
    except Unavailable as e:
        out["error"] = f"unavailable: {e}"
        return out
    out["build_s"] = round(time.perf_counter() - t_build, 2)
    out["non_embedding_params"] = non_embedding
    out["params"] = sum(p.numel() for p in ddp.module.parameters())
    flops = flops_per_token(s, case.seq, non_embedding)
    out["flops_per_token"] = flops

    gen = torch.Generator(device=device).manual_seed(0)
    batches = [
        (
            torch.randint(0, s.vocab, (mb, case.seq), device=device, generator=gen),
            torch.randint(0, s.vocab, (mb, case.seq), device=device, generator=gen),
        )
        for _ in range(accum)
    ]
    positions = torch.arange(case.seq, device=device).unsqueeze(0).expand(mb, -1)
    mask = torch.triu(torch.ones(case.seq, case.seq, dtype=torch.bool, device=device), diagonal=1)[None, None]
    loss_fn = make_loss(case, s)

    def step() -> float:
        ddp.train()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        total = 0.0
        for i, (tokens, targets) in enumerate(batches):
            with ddp.no_sync() if i < accum - 1 else nullcontext():
                if case.loss == "labels":
                    loss = ddp(tokens, positions, attention_mask=mask, labels=targets).float().mean()
                else:
                    loss = loss_fn(ddp(tokens, positions, attention_mask=mask), targets)
                (loss / accum).backward()
            total += loss.detach()
        ddp.finish_grad_sync()
        ok, _, _ = optimizer.step()
        assert ok, "optimizer step skipped"
        return total / accum

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    first = step()  # compiles/creates handles; a NaN here means broken weights
    sync()
    out["first_loss"] = float(first)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            step()
            sync()
            wall = time.perf_counter() - t0
        out["profile"] = summarise_profile(prof, wall) if cuda else None
        del prof
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    out["last_loss"] = float(loss)
    step_s = statistics.median(times)
    tok_s = out["tokens_per_step"] / step_s
    tflops = tok_s * flops["total"] / 1e12
    out.update(
        step_ms=round(step_s * 1e3, 2),
        step_ms_all=[round(t * 1e3, 2) for t in times],
        tokens_per_s=round(tok_s, 1),
        model_tflops=round(tflops, 2),
        mfu_measured=round(tflops / peaks["measured"], 4) if peaks.get("measured") else None,
        mfu_nominal=round(tflops / peaks["nominal"], 4) if peaks.get("nominal") else None,
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
    )
    return out


def run_with_retry(case: Case, args: argparse.Namespace, device: torch.device, peaks: dict) -> dict:
    """run_case; on out-of-memory, again with half the micro-batch (twice the accumulation)."""
    retried = []
    while True:
        oom = None
        try:
            result = run_case(case, args, device, peaks)
        except torch.OutOfMemoryError as e:
            oom = str(e).splitlines()[0][:200]
        except Exception as e:
            result = dataclasses.asdict(case)
            text = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else repr(e)
            # a fused kernel's extension missing (no Apex, no Transformer Engine) shows at the first step
            result["error"] = f"unavailable: {text}" if isinstance(e, ImportError) else text
            result["traceback"] = traceback.format_exc()[-3000:]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if oom is None:
            break
        retried.append(case.micro_tokens // case.seq)
        if case.micro_tokens // case.seq <= 1:
            result = dataclasses.asdict(case)
            result["error"] = f"out of memory at micro-batch 1: {oom}"
            break
        case = dataclasses.replace(case, micro_tokens=case.micro_tokens // 2)
    if retried:
        result["oom_micro_batches"] = retried
    return result


# --- cases, levers, output -------------------------------------------------------------------------


def lever_cases(base: Case) -> list[Case]:
    r = dataclasses.replace
    micro = sorted({min(base.micro_tokens * k, base.step_tokens) for k in (2, 4)} - {base.micro_tokens})
    cases = [r(base, variant=f"micro-batch x{m // base.micro_tokens}", micro_tokens=m) for m in micro]
    cases += [
        r(base, variant="bias_activation_fusion", overrides={"bias_activation_fusion": True}),
        r(base, variant="bias_dropout_fusion", overrides={"bias_dropout_fusion": True}),
        r(base, variant="megatron cross-entropy", loss="labels"),
        r(
            base,
            variant="megatron cross-entropy, fused",
            loss="labels",
            overrides={"cross_entropy_loss_fusion": True},
        ),
        r(base, variant="compiled loss", compile_loss=True),
        r(base, variant="compiled layers", compile_layers=True),
        r(base, variant="compiled layers + loss", compile_layers=True, compile_loss=True),
        r(base, variant="apply_rope_fusion", overrides={"apply_rope_fusion": True}),
        r(base, variant="gradient_accumulation_fusion", overrides={"gradient_accumulation_fusion": True}),
    ]
    if base.attention == "local":
        cases.append(r(base, variant="masked_softmax_fusion", overrides={"masked_softmax_fusion": True}))
    return [r(c, overrides=dict(c.overrides)) for c in cases]


def combine(base: Case, base_result: dict, levers: list[dict], gain: float = 1.02) -> Case | None:
    """One case with the levers that beat the base by `gain` in tokens/s: the best micro-batch, the best
    loss path, and every flag."""
    if "tokens_per_s" not in base_result:
        return None
    good = [x for x in levers if x.get("tokens_per_s", 0) > gain * base_result["tokens_per_s"]]

    def group(x: dict) -> str:
        if x["variant"].startswith("micro-batch"):
            return "micro"
        return "loss" if x["loss"] != base.loss or x["compile_loss"] else x["variant"]

    best: dict[str, dict] = {}
    for x in good:
        if group(x) not in best or x["tokens_per_s"] > best[group(x)]["tokens_per_s"]:
            best[group(x)] = x
    if len(best) < 2:
        return None
    case = dataclasses.replace(base, overrides={})
    for x in best.values():
        case.overrides.update(x["overrides"])
        case.micro_tokens = max(case.micro_tokens, x["micro_tokens"])
        case.compile_layers = case.compile_layers or bool(x.get("compile_layers"))
        case.loss, case.compile_loss = (
            (x["loss"], x["compile_loss"]) if group(x) == "loss" else (case.loss, case.compile_loss)
        )
    case.variant = "combined: " + ", ".join(x["variant"] for x in best.values())
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attention", nargs="+", default=None, help="default: every backend available")
    parser.add_argument("--shapes", nargs="+", default=["0.5b", "1.5b"], choices=sorted(SHAPES))
    parser.add_argument("--seqs", nargs="+", type=int, default=[1024, 2048, 4096])
    parser.add_argument("--step-tokens", type=int, default=32768, help="tokens per optimizer step")
    parser.add_argument("--micro-tokens", type=int, default=8192, help="tokens per micro-batch")
    parser.add_argument("--warmup", type=int, default=1, help="steps after the first and the profiled one")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (the median is reported)")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--levers", action="store_true", help="also try the next levers (see --lever-*)")
    parser.add_argument("--lever-shapes", nargs="+", default=["0.5b"], choices=sorted(SHAPES))
    parser.add_argument("--lever-seq", type=int, default=2048)
    parser.add_argument("--lever-attention", default=None, help="default: sdpa when available, else local")
    parser.add_argument("--lever-variants", nargs="+", default=None, help="only these levers (by name)")
    parser.add_argument("--only-levers", action="store_true", help="levers (and their base) only")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later cases are skipped")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="default: learner_gpu_<gpu>")
    args = parser.parse_args()
    t_start = time.perf_counter()

    device = init_distributed(seed=1234)
    available = attention_backends()
    attentions = args.attention or sorted(available, key=lambda a: a != "local")
    for a in attentions:
        if a not in available:
            parser.error(f"attention {a!r} is not available in hf_bridge.build_gpt_model ({available})")
    name = gpu_name()
    part = re.search(r"[A-Z]\d{2,4}", name or "")
    out_name = args.name or f"learner_gpu_{part.group(0).lower() if part else 'cpu'}"
    mm = matmul_tflops()
    peaks = {"measured": mm["best_tflops"] if mm else None, "nominal": nominal_tflops(name)}
    print(f"device: {name or 'cpu'}; matmul: {mm}; nominal: {peaks['nominal']}", flush=True)

    import megatron.core
    import megatron.core.optimizer as mopt
    import transformers

    payload: dict[str, Any] = {
        "gpu": name,
        "matmul": mm,
        "nominal_tflops": peaks["nominal"],
        "flops_formula": FORMULA,
        "mfu_definition": "model TFLOP/s (formula above) / measured bf16 matmul TFLOP/s (best)",
        "attention_backends": available,
        "loss": "logprob: engine.learner.loss.token_logprobs (fp32 log-softmax, target log-probs, entropy), "
        "loss = -mean log-prob; labels: Megatron's compute_language_model_loss (cross-entropy)",
        "optimizer": f"Megatron distributed optimizer over {mopt.Adam.__module__}.{mopt.Adam.__name__}, "
        "bf16 params, fp32 main params and grads (grad_reduce_in_fp32)",
        "software": {
            "megatron_core": megatron.core.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": [],
        "levers": [],
        "sdpa_over_local": [],
    }
    results: list[dict] = payload["results"]

    def over_budget() -> bool:
        return args.time_budget is not None and time.perf_counter() - t_start > args.time_budget

    def record(r: dict, into: list[dict]) -> None:
        r["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        into.append(r)
        keys = ("shape", "attention", "variant", "seq", "micro_batch", "grad_accum", "step_ms")
        keys += ("tokens_per_s", "mfu_measured", "peak_mem_gib", "error")
        line = {k: r.get(k) for k in keys}
        print(json.dumps(line), flush=True)
        payload["sdpa_over_local"] = ratios(results)
        write(args.out, out_name, payload, render(results + payload["levers"], payload))

    cases = [
        Case(shape, attn, seq, args.micro_tokens, args.step_tokens)
        for shape in args.shapes
        for attn in attentions
        for seq in args.seqs
        if not args.only_levers
    ]
    for case in cases:
        if over_budget():
            print(f"time budget spent: skipped {case}", flush=True)
            continue
        record(run_with_retry(case, args, device, peaks), results)

    if args.levers:
        lever_attn = args.lever_attention or ("sdpa" if "sdpa" in available else "local")
        for shape in args.lever_shapes:
            base = Case(shape, lever_attn, args.lever_seq, args.micro_tokens, args.step_tokens)
            base_result = next(
                (r for r in results if (r["shape"], r["attention"], r["seq"], r["variant"]) == (
                    shape, lever_attn, args.lever_seq, "base")),
                None,
            )  # fmt: skip
            if base_result is None and not over_budget():
                base_result = run_with_retry(base, args, device, peaks)
                record(base_result, results)
            done: list[dict] = []
            for case in lever_cases(base):
                if args.lever_variants and case.variant not in args.lever_variants:
                    continue
                if over_budget():
                    print(f"time budget spent: skipped {case.variant}", flush=True)
                    continue
                r = run_with_retry(case, args, device, peaks)
                done.append(r)
                record(r, payload["levers"])
            combined = combine(base, base_result or {}, done)
            if combined is not None and not over_budget():
                record(run_with_retry(combined, args, device, peaks), payload["levers"])

    table = render(results + payload["levers"], payload)
    print(table, flush=True)
    path = write(args.out, out_name, payload, table)
    print(f"wrote {path} in {time.perf_counter() - t_start:.0f} s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
