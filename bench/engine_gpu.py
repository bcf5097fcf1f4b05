"""Embedded engine throughput on one GPU: the static-cache engine against transformers `generate`.

The model is the Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
vocabulary 151936, tied embeddings, rope_theta 1e6) built from a transformers Qwen2Config in code and
randomly initialised (normal(0, 0.02), norms 1), saved to a temporary directory in bf16 with no EOS token,
so every response runs its full length. Per batch size (64 and 256 by default): random prompts of 128
tokens, responses of 256 tokens, temperature 1 (full-vocabulary sampling), and

- static engine, CUDA graphs: engine/rollout/static_engine.py driven directly (`start`, `step`), after one
  untimed warm-up run that captures the graphs; reported: generated tokens/s over the whole run (prefill
  included), the prefill time, and decode tokens/s (after the prefill);
- static engine, eager (inference.cuda_graph = false), same measurement (CUDA only);
- static engine through the engine actor's asyncio loop (engine/rollout/engines.py EmbeddedEngineActor in
  this process): what the producer sees;
- transformers `generate` of the same model on the same prompts (sdpa attention, dynamic cache,
  do_sample, top_k 0, min_new_tokens = max_new_tokens).

Log-prob mismatch: the static engine's reported log-probs of one run against a teacher-forced recompute of
the same sequences by the learner's model (engine/learner/hf_bridge.py: a Megatron GPTModel built and
loaded as the learner does, bf16, sdpa attention; `--kl-model transformers` uses the transformers
forward instead), as the learner logs it: mismatch_kl = mean over tokens of exp(d) - 1 - d with
d = learner - engine, and mean |d|.

    python -m bench.engine_gpu [--batches 64 256] [--prompt 128] [--response 256] [--out DIR]
    python -m bench.engine_gpu --tiny --device cpu --out /tmp/x      # a seconds-long code-path check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS, command, hardware, markdown_table
from bench.learner_gpu import SHAPES


def model_dir(root: Path, tiny: bool, dtype: torch.dtype) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **SHAPES["tiny" if tiny else "0.5b"],
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        hidden_act="silu",
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    model.to(dtype).save_pretrained(root)
    return root


def make_requests(batch: int, prompt: int, response: int, vocab: int, seed: int) -> list[Any]:
    from engine.wire import GenerateRequest, SamplingParams

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, prompt), generator=g).tolist()
    params = SamplingParams(max_new_tokens=response, temperature=1.0)
    return [
        GenerateRequest(rid=i, prompt_ids=tuple(x), params=params, seed=seed * 100_000 + i)
        for i, x in enumerate(ids)
    ]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_static(engine: Any, reqs: list[Any], device: str) -> tuple[dict[str, float], list[Any]]:
    sync(device)
    t0 = time.perf_counter()
    batch = engine.start(reqs)
    sync(device)
    t1 = time.perf_counter()
    results = []
    while not batch.done:
        results += batch.step()
    sync(device)
    t2 = time.perf_counter()
    tokens = sum(len(r.token_ids) for r in results)
    return {
        "tokens": tokens,
        "seconds": t2 - t0,
        "tokens_per_s": tokens / (t2 - t0),
        "prefill_s": t1 - t0,
        "decode_tokens_per_s": (tokens - len(reqs)) / (t2 - t1),
    }, sorted(results, key=lambda r: r.rid)


def run_actor(path: str, cfg: Any, reqs: list[Any], device: str) -> dict[str, float]:
    from engine.rollout.engines import EmbeddedEngineActor

    async def scenario() -> dict[str, float]:
        actor = EmbeddedEngineActor(path, cfg, 0, torch.get_num_threads(), {})
        await actor.generate(reqs)  # warm-up: graph capture
        sync(device)
        t0 = time.perf_counter()
        results = await actor.generate(reqs)
        sync(device)
        seconds = time.perf_counter() - t0
        tokens = sum(len(r.token_ids) for r in results)
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}

    return asyncio.run(scenario())


def run_generate(
    path: str, reqs: list[Any], response: int, device: str, dtype: torch.dtype
) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = (
        AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    )
    ids = torch.tensor([list(r.prompt_ids) for r in reqs], device=device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=response,
        min_new_tokens=response,
        pad_token_id=0,
    )
    with torch.no_grad():
        model.generate(
            ids[:, :8], **{**kwargs, "attention_mask": None, "max_new_tokens": 4, "min_new_tokens": 4}
        )
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        sync(device)
        seconds = time.perf_counter() - t0
    tokens = (out.shape[1] - ids.shape[1]) * out.shape[0]
    del model
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def teacher_forced(
    path: str, kind: str, seqs: torch.Tensor, device: str, dtype: torch.dtype, chunk: int
) -> torch.Tensor:
    """Log-probs [b, s-1] of seqs[:, 1:] under the learner's model (or the transformers forward)."""
    from engine.hf_config import load_hf_config
    from engine.learner.loss import token_logprobs

    hf = load_hf_config(path)
    if kind == "megatron":
        from engine.cluster import free_port
        from engine.learner import hf_bridge
        from engine.learner.parallel import init_parallel
        from engine.learner.weights import load_hf_state

        init_parallel(0, 1, 1, f"tcp://127.0.0.1:{free_port()}", seed=0)
        shape = hf_bridge.shape_of(hf)
        tconfig = hf_bridge.transformer_config(hf, shape, tp=1, params_dtype=dtype)
        model = hf_bridge.build_gpt_model(hf, shape, tconfig, attention="sdpa").to(device=device, dtype=dtype)
        with torch.no_grad():
            hf_bridge.load_hf_weights(model, load_hf_state(path), shape, 0, 1)

        def logits_of(x: torch.Tensor) -> torch.Tensor:
            s = x.shape[1]
            pos = torch.arange(s, device=device).expand_as(x)
            mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1)[None, None]
            return model(input_ids=x, position_ids=pos, attention_mask=mask)[..., : hf.vocab_size]
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device)

        def logits_of(x: torch.Tensor) -> torch.Tensor:
            return model(input_ids=x).logits

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, seqs.shape[0], chunk):
            x = seqs[i : i + chunk].to(device)
            logp, _ = token_logprobs(logits_of(x)[:, :-1], x[:, 1:], 1.0)
            out.append(logp.float().cpu())
    return torch.cat(out)


def mismatch(
    path: str,
    kind: str,
    reqs: list[Any],
    results: list[Any],
    prompt: int,
    device: str,
    dtype: torch.dtype,
    chunk: int,
) -> dict[str, float]:
    seqs = torch.tensor([list(q.prompt_ids) + r.token_ids for q, r in zip(reqs, results, strict=True)])
    learner = teacher_forced(path, kind, seqs, device, dtype, chunk)[:, prompt - 1 :]
    engine = torch.tensor([r.logprobs for r in results])
    d = learner.double() - engine.double()
    return {
        "kl_model": kind,
        "mismatch_kl": float((torch.expm1(d) - d).mean()),
        "logprob_abs_diff": float(d.abs().mean()),
        "tokens": int(d.numel()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model: checks the code path in seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--prompt", type=int, default=None)
    parser.add_argument("--response", type=int, default=None)
    parser.add_argument("--kl-model", choices=["megatron", "transformers"], default="megatron")
    parser.add_argument("--kl-chunk", type=int, default=16, help="sequences per teacher-forced forward")
    parser.add_argument("--skip", nargs="*", default=[], choices=["eager", "actor", "generate", "kl"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    tiny, device = args.tiny, args.device
    batches = args.batches or ([4, 8] if tiny else [64, 256])
    prompt, response = args.prompt or (16 if tiny else 128), args.response or (24 if tiny else 256)
    dtype = torch.bfloat16
    from engine.rollout.config import InferenceConfig
    from engine.rollout.static_engine import StaticEngine

    rows, cases = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = str(model_dir(Path(tmp), tiny, dtype))
        vocab = SHAPES["tiny" if tiny else "0.5b"]["vocab_size"]
        kl: dict[str, Any] | None = None
        for b in batches:
            reqs = make_requests(b, prompt, response, vocab, seed=b)
            kw = dict(dtype="bfloat16", device=device, max_batch_size=b, context_length=prompt + response)
            variants = [("static, CUDA graphs", True)] if device == "cuda" else [("static, eager", False)]
            if device == "cuda" and "eager" not in args.skip:
                variants.append(("static, eager", False))
            for name, graphs in variants:
                engine = StaticEngine(path, cuda_graph=graphs, **kw)
                run_static(engine, reqs, device)  # warm-up (captures the graphs)
                stats, results = run_static(engine, reqs, device)
                cases.append({"batch": b, "engine": name, **stats, "graphs": engine.runner.graphs})
                if kl is None and "kl" not in args.skip:
                    kl = {
                        "batch": b,
                        **mismatch(path, args.kl_model, reqs, results, prompt, device, dtype, args.kl_chunk),
                    }
                del engine
            if "actor" not in args.skip:
                cfg = InferenceConfig(
                    batch_wait_ms=0.0,
                    engine_impl="static",
                    device=device,
                    **{k: v for k, v in kw.items() if k != "device"},
                )  # type: ignore[arg-type]
                cases.append(
                    {"batch": b, "engine": "static via engine actor", **run_actor(path, cfg, reqs, device)}
                )
            if "generate" not in args.skip:
                cases.append(
                    {
                        "batch": b,
                        "engine": "transformers generate",
                        **run_generate(path, reqs, response, device, dtype),
                    }
                )
            if device == "cuda":
                torch.cuda.empty_cache()
    for c in cases:
        base = next(
            (x for x in cases if x["batch"] == c["batch"] and x["engine"] == "transformers generate"), None
        )
        c["speedup_vs_generate"] = c["tokens_per_s"] / base["tokens_per_s"] if base else None
        rows.append(
            [
                c["batch"],
                c["engine"],
                round(c["tokens_per_s"]),
                round(c["seconds"], 3),
                c.get("prefill_s", ""),
                c["speedup_vs_generate"] or "",
            ]
        )
    hw = hardware()
    payload = {
        "benchmark": "engine_gpu",
        "date": time.strftime("%Y-%m-%d"),
        "command": command(),
        "hardware": hw,
        "shape": "tiny" if tiny else "qwen2.5-0.5b",
        "dtype": "bfloat16",
        "prompt": prompt,
        "response": response,
        "cases": cases,
        "logprob_mismatch": kl,
    }
    table = markdown_table(["batch", "engine", "tokens/s", "seconds", "prefill s", "x generate"], rows)
    if kl:
        table += (
            f"\n\nlog-prob mismatch (batch {kl['batch']}, {kl['tokens']} tokens, "
            f"recompute by {kl['kl_model']}): mismatch_kl {kl['mismatch_kl']:.3g}, "
            f"mean |d| {kl['logprob_abs_diff']:.3g}"
        )
    print(table)
    device_name = (hw["gpu"] or "cpu").split()[-1].lower() if device == "cuda" else "cpu"
    name = f"engine_gpu_{'tiny_' if tiny else ''}{device_name}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    machine = f"{hw['gpu'] or hw['cpu']}; torch {hw['torch']}; {payload['date']}"
    (args.out / f"{name}.md").write_text(f"# {name}\n\n{machine}\n\n`{payload['command']}`\n\n{table}\n")
    return payload


if __name__ == "__main__":
    main()
