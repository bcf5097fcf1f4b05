"""Optimizer, learning-rate schedule and gradient synchronisation for a learner model (actor or critic).

Guarantee: after `sync_and_clip`, every rank holds the same gradient (the sum over data-parallel ranks,
TP-partial gradients summed over tensor-parallel ranks, the two pipeline stages' copies of tied
embeddings summed), the returned norm is the L2 norm of the full model's gradient with each TP shard and
each pipeline stage's parameters counted once, and clipping scales all of it by one factor. Under
expert parallelism (ep > 1), expert parameters (Megatron's `allreduce = False`) are summed over the
expert-data-parallel group instead, and the norm counts every EP rank's experts once.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from engine.learner.config import OptimizerConfig


def allreduce_sum(tensors: list[torch.Tensor], group: Any) -> None:
    """In-place sum of tensors across a process group, as one flat collective."""
    if not tensors:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    for t, synced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors), strict=True):
        t.copy_(synced)


class ModelOptimizer(abc.ABC):
    """One model's optimizer as a learner step uses it: zero_grad, the backward passes, then step."""

    @property
    @abc.abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """The parameter groups (learning rate and weight decay are set here by the scheduler)."""

    @abc.abstractmethod
    def zero_grad(self) -> None: ...

    @abc.abstractmethod
    def step(self) -> float:
        """Synchronise gradients over ranks, clip them, update the weights; returns the gradient norm."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def offload(self) -> None:
        """Free the device memory the optimizer holds between steps (its state kept on the host)."""

    @abc.abstractmethod
    def reload(self) -> None:
        """Undo offload before the next step."""


class TorchModelOptimizer(ModelOptimizer):
    """torch AdamW or SGD over the trainable parameters (biases and norms without weight decay), with the
    gradient synchronisation of `sync_and_clip` (sync: its keyword arguments other than the parameters)."""

    def __init__(self, model: torch.nn.Module, cfg: OptimizerConfig, lr: float, sync: dict[str, Any]) -> None:
        self.params = list(model.parameters())
        self.sync, self.max_norm = sync, cfg.clip_grad
        decay = [p for p in self.params if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in self.params if p.requires_grad and p.ndim <= 1]
        groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
        self.inner: torch.optim.Optimizer
        if cfg.optimizer == "sgd":
            self.inner = torch.optim.SGD(groups, lr=lr, momentum=cfg.sgd_momentum)
        else:
            betas = (cfg.adam_beta1, cfg.adam_beta2)
            self.inner = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=cfg.adam_eps)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    def step(self) -> float:
        norm = sync_and_clip(self.params, max_norm=self.max_norm, **self.sync)
        self.inner.step()
        return norm

    def offload(self) -> None:  # the CPU learner's state is in host memory already
        pass

    def reload(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def make_optimizer(
    model: torch.nn.Module, cfg: OptimizerConfig, lr: float, sync: dict[str, Any]
) -> ModelOptimizer:
    """Megatron's distributed optimizer when the model is on CUDA (engine/learner/megatron_optim.py),
    torch's on the CPU, where Megatron's optimizer wrapper cannot run."""
    if next(model.parameters()).is_cuda:
        from engine.learner.megatron_optim import MegatronModelOptimizer

        return MegatronModelOptimizer(model, cfg, lr)
    return TorchModelOptimizer(model, cfg, lr, sync)


def make_scheduler(
    optimizer: ModelOptimizer, cfg: OptimizerConfig, total_steps: int, lr: float
) -> OptimizerParamScheduler:
    """Megatron's scheduler: linear warm-up to lr, then constant / linear / cosine decay to min_lr (scaled
    by lr / cfg.lr for a model with its own rate), weight decay applied by parameter group."""
    cfg.check_schedule(total_steps)
    decay_steps = cfg.decay_steps(total_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.lr_warmup_iters else lr,
        max_lr=lr,
        min_lr=cfg.min_lr * lr / cfg.lr,
        lr_warmup_steps=cfg.lr_warmup_iters,
        lr_decay_steps=max(decay_steps, cfg.lr_warmup_iters + 1),
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )


def sync_and_clip(
    params: list[torch.nn.Parameter],
    *,
    tp_partial: list[torch.nn.Parameter],
    tp_group: Any,
    tp: int,
    dp_group: Any,
    dp: int,
    max_norm: float,
    pp_group: Any = None,
    pp: int = 1,
    embd_group: Any = None,
    tied: list[torch.nn.Parameter] | None = None,
    tied_copy: bool = False,
    ep_group: Any = None,
    ep: int = 1,
    expert_dp_group: Any = None,
    expert_dp: int = 1,
) -> float:
    """Synchronise gradients across ranks, clip them to max_norm (0: no clipping), return the norm.

    params: this pipeline stage's parameters (pp stages in pp_group). tied: this stage's copy of weights
    another stage also holds (the word embeddings of the first stage and the output layer of the last,
    with tied embeddings): their gradients are summed over embd_group, and the copy (tied_copy: this
    stage's is not the original) is left out of the norm."""
    if tp > 1:  # replicated parameters each rank applies to its own heads only (QK norms), as Megatron
        allreduce_sum([p.grad for p in tp_partial if p.grad is not None], tp_group)
    grads = [p for p in params if p.grad is not None]
    experts = {id(p) for p in grads if ep > 1 and not getattr(p, "allreduce", True)}
    if dp > 1:
        allreduce_sum([p.grad for p in grads if id(p) not in experts], dp_group)
    if expert_dp > 1:
        allreduce_sum([p.grad for p in grads if id(p) in experts], expert_dp_group)
    if tied:  # as Megatron's finalize_model_grads: both copies get the sum of their gradients
        allreduce_sum([p.grad for p in tied], embd_group)
    copies = {id(p) for p in tied or []} if tied_copy else set()
    sq = torch.zeros(2, dtype=torch.float64)  # [other parameters, this EP rank's experts]
    for p in grads:
        if param_is_not_tensor_parallel_duplicate(p) and id(p) not in copies:
            sq[int(id(p) in experts)] += p.grad.detach().double().square().sum()
    if tp > 1:
        dist.all_reduce(sq, group=tp_group)
    if pp > 1:
        dist.all_reduce(sq, group=pp_group)
    if ep > 1:  # each EP rank holds other experts
        expert_sq = sq[1:].clone()
        dist.all_reduce(expert_sq, group=ep_group)
        sq[1:] = expert_sq
    norm = float(sq.sum().sqrt())
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in grads:
            p.grad.mul_(scale)
    return norm
