"""A learner rank's state in an iteration directory and back: weights, optimizer, LR schedule, RNG.

What one rank writes (engine/checkpoint.py has the whole directory layout):
- `model/`: the actor in Megatron's distributed checkpoint format (megatron.core.dist_checkpointing,
  torch_dist backend), from GPTModel.sharded_state_dict(): each tensor once, with its global shape and
  this rank's offsets, written by all ranks together;
- `critic/`: the same for PPO's critic (its value head included);
- `ranks/rank_NNN.pt`: this rank's torch optimizer and LR-scheduler state dicts (the critic's too) and
  its RNG states (python, numpy, torch, Megatron's model-parallel RNG tracker).

Guarantee: `load_learner` on every rank of a learner laid out like the one that ran `save_learner`
(same tensor, pipeline, expert and context parallel sizes and rank count) restores parameters, optimizer
state, scheduler step and RNG states exactly, so training continues as if it had never stopped.
`load_model` alone (weights only) needs the same global tensor shapes, not the same layout.

The CPU learner's optimizer is torch's AdamW / SGD (Megatron's distributed optimizer needs a GPU); on
CUDA it is Megatron's distributed optimizer, whose state is this rank's shard of the fp32 master weights
and moments (engine/learner/megatron_optim.py). Either way the optimizer state is saved per rank.
Megatron's torch_dist writer forks worker processes and needs psutil; the
model files are therefore written in-process by torch.distributed.checkpoint with Megatron's save
planner (`InProcessTorchDistSave`): the same format, read back by dist_checkpointing.load.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.tensor_parallel import random as mrandom

MODEL, CRITIC, RANKS = "model", "critic", "ranks"


class InProcessTorchDistSave(TorchDistSaveShardedStrategy):
    """Megatron's torch_dist format, written synchronously by this process (no forked writers)."""

    def save(self, sharded_state_dict: Any, checkpoint_dir: Any) -> None:
        state, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica
        )
        dcp.save(
            mcore_to_pyt_state_dict(state, False),
            storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
            planner=MCoreSavePlanner(
                dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
            ),
        )


def save_model(model: torch.nn.Module, path: Path) -> None:
    """Write model's sharded state dict to path (collective: every rank calls it)."""
    path.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(
        model.sharded_state_dict(), str(path), sharded_strategy=InProcessTorchDistSave("torch_dist", 1)
    )


def load_model(model: torch.nn.Module, path: Path) -> None:
    """Read model's weights from a directory written by save_model (collective)."""
    state = dist_checkpointing.load(model.sharded_state_dict(), str(path))
    model.load_state_dict(state, strict=True)


def rng_state() -> dict[str, Any]:
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "gauss": [has_gauss, gauss]},
        "torch": torch.get_rng_state(),
        "tracker": mrandom.get_cuda_rng_tracker().get_states(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], *n["gauss"]))
    torch.set_rng_state(state["torch"])
    mrandom.get_cuda_rng_tracker().set_states(state["tracker"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rank_file(root: Path, rank: int) -> Path:
    return root / RANKS / f"rank_{rank:03d}.pt"


def layout(w: Any) -> dict[str, int]:
    """Where rank w sits: its per-rank files only fit a rank at the same place."""
    sizes = {"tp": w.tp, "pp": getattr(w, "pp", 1), "ep": getattr(w, "ep", 1)}
    if getattr(w, "cp", 1) > 1:  # named only when used, so checkpoints without CP keep their layout
        sizes["cp"] = w.cp
    return {"rank": w.rank, "world_size": w.world_size, **sizes}


def save_learner(w: Any, root: Path) -> None:
    """Write learner rank w's state under root (collective; w is a LearnerWorker)."""
    save_model(w.model, root / MODEL)
    state: dict[str, Any] = {
        "layout": layout(w),
        "optimizer": w.optimizer.state_dict(),
        "scheduler": w.scheduler.state_dict(),
        "rng": rng_state(),
    }
    if w.critic is not None:
        save_model(w.critic.model, root / CRITIC)
        state["critic_optimizer"] = w.critic.optimizer.state_dict()
        state["critic_scheduler"] = w.critic.scheduler.state_dict()
    rank_file(root, w.rank).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, rank_file(root, w.rank))
    dist.barrier()


def load_learner(w: Any, root: Path) -> None:
    """Restore learner rank w from root, written by save_learner under the same layout (collective)."""
    path = rank_file(root, w.rank)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was saved by fewer learner ranks")
    state = torch.load(path, weights_only=True)
    if state["layout"] != layout(w):
        raise ValueError(f"{path} was saved by learner rank {state['layout']}, this rank is {layout(w)}")
    load_model(w.model, root / MODEL)
    w.optimizer.load_state_dict(state["optimizer"])
    w.scheduler.load_state_dict(state["scheduler"])
    if w.critic is not None:
        load_model(w.critic.model, root / CRITIC)
        w.critic.optimizer.load_state_dict(state["critic_optimizer"])
        w.critic.scheduler.load_state_dict(state["critic_scheduler"])
    set_rng_state(state["rng"])
