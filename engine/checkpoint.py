"""Checkpoint directories: their layout, which weights a run starts from, and the checks on a resume.

    save/
      latest                      the newest complete iteration, as text ("4"); replaced last
      iter_0000004/
        model/                    actor, Megatron distributed checkpoint (torch_dist)
        critic/                   PPO's critic, the same format (only with advantage_estimator = ppo)
        ranks/rank_NNN.pt         per learner rank: optimizer, LR scheduler, RNG states
        rollout_state.msgpack     prompt order position, group ids, pending and cached groups
        hf/                       the actor as an HF checkpoint (ckpt.save_hf)
        meta.json                 step, and the model, layout, schedule and data it was saved with
        complete                  written last

Guarantees: an iteration directory is written under a temporary name, gets its `complete` marker
last, and only then its final name; `latest` is replaced (atomically) after that. A crash at any point
leaves the previous checkpoint or the new one, and never a partial one that would be loaded.
`plan_start` resumes from ckpt.load only through a `latest` naming a complete iteration; a `latest`
naming anything else is an error naming ckpt.load and the path, and so is a checkpoint whose model,
parallel layout, optimizer schedule or prompt order differs from the config (naming what differs).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ConfigError

LATEST, COMPLETE, META, ROLLOUT_STATE, HF = "latest", "complete", "meta.json", "rollout_state.msgpack", "hf"
FORMAT = 1
MODEL_FIELDS = (
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)
log = logging.getLogger("engine.checkpoint")


def iteration_dir(save: str | Path, step: int) -> Path:
    return Path(save) / f"iter_{step:07d}"


def is_iteration(path: str | Path) -> bool:
    """A complete iteration directory (its `complete` marker is written last)."""
    return (Path(path) / COMPLETE).is_file() and (Path(path) / META).is_file()


def has_hf_weights(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and any(
        (p / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")
    )


def latest_iteration(root: str | Path, key: str) -> Path | None:
    """The complete iteration root/latest names; None without `latest`; an error naming ckpt.<key> and
    the path when `latest` names a missing or incomplete one."""
    latest = Path(root) / LATEST
    if not latest.is_file():
        return None
    text = latest.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{latest} does not hold an iteration number: {text!r}", section="ckpt", key=key)
    it = iteration_dir(root, int(text))
    if not it.is_dir():
        raise ConfigError(
            f"{latest} names iteration {int(text)}, but {it} does not exist", section="ckpt", key=key
        )
    if not is_iteration(it):
        raise ConfigError(
            f"{latest} names {it}, which is incomplete (no `{COMPLETE}` marker: its save did not finish)",
            section="ckpt",
            key=key,
        )
    return it


def read_meta(it: Path) -> dict[str, Any]:
    return json.loads((it / META).read_text())


def describe(config: Any, hf_config: Any, num_prompts: int) -> dict[str, Any]:
    """What a checkpoint must agree on with the config to be resumed, by the config key that sets it."""
    c, opt = config, config.optimizer
    tp = c.perf.tensor_model_parallel_size
    multiple = c.model.make_vocab_size_divisible_by * tp
    out: dict[str, Any] = {f"ckpt.hf_checkpoint {k}": getattr(hf_config, k, None) for k in MODEL_FIELDS}
    out["padded vocabulary (model.make_vocab_size_divisible_by x TP size)"] = (
        -(-hf_config.vocab_size // multiple) * multiple
    )
    out.update(
        {
            "perf.tensor_model_parallel_size": tp,
            "perf.pipeline_model_parallel_size": c.perf.pipeline_model_parallel_size,
            "perf.expert_model_parallel_size": c.perf.expert_model_parallel_size,
            "cluster.learner_ranks": c.cluster.learner_ranks,
            "algo.advantage_estimator is ppo (a critic)": c.algo.needs_critic,
            "optimizer.optimizer": opt.optimizer,
            "optimizer.lr": opt.lr,
            "optimizer.min_lr": opt.min_lr,
            "optimizer.lr_decay_style": opt.lr_decay_style,
            "optimizer.lr_warmup_iters": opt.lr_warmup_iters,
            "optimizer.weight_decay": opt.weight_decay,
            "algo.critic_lr": c.algo.critic_lr,
            "rollout.prompt_data (prompts)": num_prompts,
            "rollout.shuffle": c.rollout.shuffle,
            "rollout.seed": c.rollout.seed,
        }
    )
    return out


def schedule_length(config: Any, num_rollout: int) -> dict[str, Any]:
    """The decay length, which must match too unless the schedule is constant."""
    if config.optimizer.lr_decay_style == "constant":
        return {}
    steps = config.optimizer.decay_steps(num_rollout * config.rollout.num_steps_per_rollout)
    return {"optimizer.lr_decay_iters (default: num_rollout x num_steps_per_rollout)": steps}


WEIGHTS_ONLY = ("ckpt.hf_checkpoint", "padded vocabulary")


def check_compatible(it: Path, expected: dict[str, Any], key: str, weights_only: bool = False) -> None:
    """Raise a ConfigError naming every field where the checkpoint at `it` differs from the config."""
    meta = read_meta(it)
    if meta.get("format") != FORMAT:
        raise ConfigError(
            f"{it} has checkpoint format {meta.get('format')}, expected {FORMAT}", section="ckpt", key=key
        )
    saved = meta["layout"]
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, config {v!r}"
        for k, v in expected.items()
        if (not weights_only or k.startswith(WEIGHTS_ONLY)) and saved.get(k) != v
    ]
    if diffs:
        raise ConfigError(f"{it} does not match the config: " + "; ".join(diffs), section="ckpt", key=key)


@dataclass(frozen=True)
class Start:
    """Where a run starts: the weights of each part, and the checkpoint it resumes (if any)."""

    actor_init: str  # HF directory or iteration directory: the actor's (and critic's) initial weights
    engine_init: str  # HF directory the engines load first
    step: int = 0  # rollout steps already trained (the policy version at the start)
    resume: str | None = None  # iteration directory the whole state comes from
    push_weights: bool = False  # the engines need the learner's weights before generating
    layout: dict[str, Any] = field(default_factory=dict)  # describe() + schedule_length(), for meta.json


def plan_start(config: Any, hf_config: Any, num_prompts: int, num_rollout: int) -> Start:
    """Resume from ckpt.load when it holds a checkpoint, else start from ckpt.ref_load (logged)."""
    c = config.ckpt
    layout = {**describe(config, hf_config, num_prompts), **schedule_length(config, num_rollout)}
    ref = c.ref_load or c.hf_checkpoint
    ref_key = "ref_load" if c.ref_load else "hf_checkpoint"
    ref_it = latest_iteration(ref, ref_key) or (Path(ref) if is_iteration(ref) else None)
    if ref_it is not None:
        check_compatible(ref_it, layout, ref_key, weights_only=True)
    elif not has_hf_weights(ref):
        raise ConfigError(
            f"{ref!r} is neither an HF checkpoint (config.json + model.safetensors) nor a checkpoint "
            f"written to ckpt.save ({LATEST} or {COMPLETE})",
            section="ckpt",
            key=ref_key,
        )
    weights = str(ref_it or ref)
    engines = c.hf_checkpoint if ref_it is not None else ref
    resume = latest_iteration(c.load, "load") if c.load else None
    if resume is None:
        _explain_fresh_start(config, weights)
        return Start(weights, engines, push_weights=ref_it is not None, layout=layout)
    check_compatible(resume, layout, "load")
    step = int(read_meta(resume)["step"])
    if step >= num_rollout:
        raise ConfigError(
            f"{resume} is at rollout step {step} and rollout.num_rollout is {num_rollout}: nothing to train",
            section="ckpt",
            key="load",
        )
    log.info("resuming from %s (rollout step %d)", resume, step)
    return Start(weights, engines, step=step, resume=str(resume), push_weights=True, layout=layout)


def _explain_fresh_start(config: Any, weights: str) -> None:
    c = config.ckpt
    if c.load:
        why = "holds no `latest`"
        if has_hf_weights(c.load):
            why += " (it is an HF checkpoint: initial HF weights belong in ckpt.ref_load)"
        elif list(Path(c.load).glob("iter_*")):
            why += f" (iterations there: {sorted(p.name for p in Path(c.load).glob('iter_*'))})"
        log.warning("ckpt.load=%s %s: not resuming", c.load, why)
    if c.save and c.save != c.load and (Path(c.save) / LATEST).is_file():
        log.warning("ckpt.save=%s holds a checkpoint that this run will overwrite", c.save)
    log.info("starting from the weights of %s", weights)


def begin(save: str | Path, step: int) -> Path:
    """A fresh temporary directory for iteration `step` (every rank writes into it)."""
    tmp = iteration_dir(save, step).with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, step: int, *, layout: dict[str, Any], rollout_state: bytes, **info: Any) -> Path:
    """Finish the iteration written into tmp: rollout state, meta.json, the `complete` marker, the final
    name, then `latest` (in this order, see the module docstring)."""
    (tmp / ROLLOUT_STATE).write_bytes(rollout_state)
    meta = {"format": FORMAT, "step": step, **info, "layout": layout}
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    _write_synced(tmp / COMPLETE, f"{step}\n")
    final = iteration_dir(tmp.parent, step)
    old = final.with_suffix(".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _write_synced(tmp.parent / (LATEST + ".tmp"), f"{step}\n")
    os.replace(tmp.parent / (LATEST + ".tmp"), tmp.parent / LATEST)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def resume_hint(save: str | None) -> str:
    """What to tell a user whose run ended on a failure: the checkpoint to resume from, if any."""
    latest = Path(save) / "latest" if save else None
    if latest is None or not latest.exists():
        return "no checkpoint was saved to resume from (set ckpt.save and ckpt.save_interval)"
    return f"resume with ckpt.load={save} (latest complete iteration: {latest.read_text().strip()})"
