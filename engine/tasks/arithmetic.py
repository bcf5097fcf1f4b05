"""Built-in task `arithmetic`: add two numbers below 100, answer checked by the `math` reward.

What the build writes (about 40 s on 2 CPU cores, then cached):
  train.jsonl / eval.jsonl  disjoint operand pairs, OpenAI-format messages, label = the sum
  model/                    a Qwen2-architecture checkpoint (config.json, model.safetensors, tokenizer)

The checkpoint is warm-started by supervised training on a deliberately noisy teacher: half of its
answers are wrong by a plausible slip (+-1, +-2, +-10). The model learns addition (its greedy answer is
almost always right) but samples a wrong answer about half the time at temperature 1, the situation
reinforcement learning with a verifiable reward is for: the right answer is in the policy, and the reward
moves the probability mass onto it. Everything is seeded, so the build is deterministic on a machine.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch

from engine.tasks.char_tokenizer import build_char_tokenizer

log = logging.getLogger(__name__)

RECIPE_VERSION = "v1"
MAX_OPERAND = 100
NUM_EVAL = 200
NOISE = 0.5
SLIPS = (-10, -2, -1, 1, 2, 10)
SFT_STEPS = 1000
SFT_BATCH = 128
SFT_LR = 3e-3
SEED = 20261128


def model_config() -> dict:
    """The tiny Qwen2 architecture: 3 layers, hidden 64, grouped-query attention (4 heads, 2 KV heads)."""
    return dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        torch_dtype="float32",
    )


def record(a: int, b: int) -> dict:
    return {
        "input": [{"role": "user", "content": f"{a}+{b}"}],
        "label": str(a + b),
        "metadata": {"a": a, "b": b},
    }


def split_pairs() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Disjoint (train, eval) operand pairs."""
    pairs = [(a, b) for a in range(MAX_OPERAND) for b in range(MAX_OPERAND)]
    random.Random(SEED).shuffle(pairs)
    return pairs[NUM_EVAL:], pairs[:NUM_EVAL]


def write_jsonl(path: Path, pairs: list[tuple[int, int]]) -> None:
    with open(path, "w") as f:
        for a, b in pairs:
            f.write(json.dumps(record(a, b)) + "\n")


def noisy_answer(a: int, b: int, rng: random.Random) -> int:
    s = a + b
    if rng.random() < NOISE:
        s = max(0, s + rng.choice(SLIPS))
    return s


def warm_start(out_dir: Path, train: list[tuple[int, int]]) -> None:
    """Supervised warm start of a fresh Qwen2 model on noisy-teacher answers; saves an HF checkpoint."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    torch.manual_seed(SEED)
    rng = random.Random(SEED + 1)
    model = Qwen2ForCausalLM(Qwen2Config(**model_config()))
    opt = torch.optim.AdamW(model.parameters(), lr=SFT_LR, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=SFT_LR, total_steps=SFT_STEPS, pct_start=0.1)

    def encode(a: int, b: int) -> tuple[list[int], list[int]]:
        prompt = tokenizer.apply_chat_template(
            record(a, b)["input"], tokenize=False, add_generation_prompt=True
        )
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        r = tokenizer(f"{noisy_answer(a, b, rng)}{tokenizer.eos_token}", add_special_tokens=False).input_ids
        return p, r

    start = time.monotonic()
    model.train()
    for step in range(SFT_STEPS):
        batch = [encode(a, b) for a, b in rng.sample(train, SFT_BATCH)]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.zeros(SFT_BATCH, width, dtype=torch.long)
        labels = torch.full((SFT_BATCH, width), -100, dtype=torch.long)
        attn = torch.zeros(SFT_BATCH, width, dtype=torch.long)
        for i, (p, r) in enumerate(batch):
            n = len(p) + len(r)
            ids[i, :n] = torch.tensor(p + r)
            labels[i, len(p) : n] = torch.tensor(r)
            attn[i, :n] = 1
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if (step + 1) % (SFT_STEPS // 10) == 0:
            log.info(
                "arithmetic warm start: step %d/%d loss %.3f (%.0fs)",
                step + 1,
                SFT_STEPS,
                loss.item(),
                time.monotonic() - start,
            )
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True)


def build(out_dir: Path) -> None:
    """Write data, tokenizer and the warm-started checkpoint into out_dir."""
    log.info("building the built-in arithmetic task in %s (first use only, about a minute)", out_dir)
    train, evaluation = split_pairs()
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "eval.jsonl", evaluation)
    model_dir = out_dir / "model"
    build_char_tokenizer(model_dir)
    warm_start(model_dir, train)
