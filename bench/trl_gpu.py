"""TRL's GRPOTrainer on the task, model, sample count and device of bench/e2e_gpu.py: the reference our
samples/s is compared with (bench/e2e_gpu.py --trl runs both in one run).

The same random Qwen2.5-shaped checkpoint with the arithmetic task's character tokenizer, the same
prompts (builtin:arithmetic/train.jsonl, chat template), the same math reward (our verifier), 32 prompts x
8 generations = 256 completions per optimizer step (per-device batch 64 x 4 accumulation steps, one
generation of 256 per step), responses up to --response-len tokens at temperature 1, no KL term (beta 0,
no reference model, as ours), Adam at lr 1e-6, bf16 on a GPU. TRL generates with transformers (no vLLM
on this host). Steps after the first --skip are timed (a callback stamps each optimizer step's end).

Needs trl, accelerate and datasets importable (they are not dependencies of this project). The GPU host
lacks them: a third wheel folder beside ../shared/device's two (Python 3.12 wheels of trl, accelerate,
datasets, pyarrow, pandas, dill, xxhash, multiprocess, fsspec, psutil; about 60 MiB, so pyarrow travels
in a run of its own) installed with `pip install --no-index --no-deps --target /tmp/site`.

    python -m bench.trl_gpu [--shape 0.5b | --model DIR] [--steps 4] [--skip 1] [--response-len 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

GROUPS, GENERATIONS = 32, 8


def dataset(limit: int) -> Any:
    """The first `limit` arithmetic prompts as conversational rows. Built from an Arrow table with a
    fixed fingerprint: datasets' content hashing (dill over Arrow types) breaks with some pyarrow/dill
    pairs, and nothing here is cached."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    from engine.tasks import resolve_path

    path = Path(resolve_path("builtin:arithmetic/train.jsonl"))
    rows = [json.loads(x) for x in path.read_text().splitlines()[:limit]]
    table = InMemoryTable.from_pydict(
        {
            "prompt": [r["input"] for r in rows],  # chat messages already
            "label": [r["label"] for r in rows],
        }
    )
    return Dataset(table, fingerprint=f"arithmetic-{limit}")


def math_reward(completions: list[Any], label: list[Any], **_: Any) -> list[float]:
    """Our math verifier (engine/rollout/rewards) on each completion's text."""
    from engine.rollout.rewards.verifiers import math_reward as score

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(score(t, y, {})) for t, y in zip(texts, label, strict=True)]


def run_trl(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    """TRL's GRPO for args.steps optimizer steps; samples/s over the steps after args.skip."""
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cuda = torch.cuda.is_available()
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    per_step = GROUPS * GENERATIONS
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=per_step // 4,
            gradient_accumulation_steps=4,
            num_generations=GENERATIONS,
            max_completion_length=args.response_len,
            temperature=1.0,
            learning_rate=1e-6,
            beta=0.0,
            loss_type="grpo",
            bf16=cuda,
            use_cpu=not cuda,
            max_steps=args.steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=0,
        )
        trainer = GRPOTrainer(
            model=str(model),
            reward_funcs=math_reward,
            args=config,
            train_dataset=dataset(per_step * args.steps),
            processing_class=AutoTokenizer.from_pretrained(model),
            callbacks=[Stamp()],
        )
        start = time.perf_counter()
        trainer.train()
    steps = [b - a for a, b in zip([start, *stamps], stamps, strict=False)]
    timed = steps[args.skip :]
    import trl

    return {
        "trl": trl.__version__,
        "steps_timed": len(timed),
        "step_s": [round(s, 3) for s in steps],
        "samples_per_s": round(per_step / statistics.median(timed), 2),
        "samples_per_step": per_step,
    }


def main() -> None:
    from bench.e2e_gpu import make_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="0.5b")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip", type=int, default=1)
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint made by bench/e2e_gpu.py")
    args = parser.parse_args()
    if args.model is not None:
        result = run_trl(args.model, args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_trl(make_model(args.shape, Path(tmp) / "model"), args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
