"""Megatron's mixed-precision distributed optimizer for a learner model on CUDA.

Guarantee: `MegatronModelOptimizer.step` leaves the model as `TorchModelOptimizer` (engine/learner/optim.py)
would for the same backward passes: the gradient of the global-batch loss summed (not averaged) over
data-parallel ranks, QK-norm gradients summed over tensor-parallel ranks and tied embeddings over pipeline
stages (Megatron's finalize_model_grads), clipped to clip_grad by the norm over the whole model, then one
Adam/SGD update. The difference is where the numbers live: the model holds bf16 (or fp32) weights, the
gradients accumulate into fp32 buffers (Megatron's DistributedDataParallel), and fp32 master weights and
Adam moments are sharded over data-parallel ranks (ZeRO-1, Megatron's DistributedOptimizer). Megatron
shards Adam only: SGD keeps whole fp32 master weights on every rank (its mixed-precision optimizer).

Colocated mode moves the master weights and moments to host memory between steps (`offload`) through
page-locked buffers allocated on the first offload and reused after, so each move is one asynchronous
copy per tensor at the bus's rate rather than a fresh pageable allocation and a blocking copy.

Megatron's optimizer wrapper needs CUDA, so the CPU learner uses torch's optimizers instead.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.learner.config import OptimizerConfig
from engine.learner.optim import ModelOptimizer


def unpadded(shard: dict[Any, Any]) -> dict[Any, Any]:
    """A shard from get_parameter_state_dp_reshardable as its loader reads it: Megatron's loader expects
    every parameter entry to say whether it is padding, which only its sharded-checkpoint path adds."""
    for key, by_dtype in shard.items():
        if isinstance(key, int):
            for buckets in by_dtype.values():
                for bucket in buckets:
                    for entry in bucket:
                        entry.setdefault("padding", False)
    return shard


def own_step_tensors(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter's Adam state a step counter of its own. Megatron 0.16's distributed optimizer,
    without Transformer Engine or apex, restores the step as ONE tensor shared by all parameters; torch's
    multi-tensor Adam then increments it once per parameter, so after a resume each parameter's bias
    correction used a different, too-large step (measured: the first step after resume off by 15 % of
    its size)."""
    for param_state in optimizer.state.values():
        step = param_state.get("step")
        if isinstance(step, torch.Tensor):
            param_state["step"] = step.detach().clone()


class PinnedOffload:
    """The optimizer tensors of a torch optimizer (its parameters, the master weights, and every state
    tensor) moved between the GPU and page-locked host buffers that persist across moves. Parameters keep
    their identity (only .data moves), so the optimizer's state, keyed by parameter, stays valid."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.host: list[torch.Tensor] | None = None
        self.on_host = False

    def _slots(self) -> list[tuple[Any, Any]]:
        """(holder, key) of every CUDA tensor, in a fixed order: params by group, then state by param."""
        slots: list[tuple[Any, Any]] = []
        for group in self.optimizer.param_groups:
            slots += [(p, "data") for p in group["params"] if p.is_cuda or self.on_host]
        for param_state in self.optimizer.state.values():
            for key, v in param_state.items():
                if isinstance(v, torch.Tensor) and (v.is_cuda or (self.on_host and v.is_pinned())):
                    slots.append((param_state, key))
        return slots

    @staticmethod
    def _get(holder: Any, key: Any) -> torch.Tensor:
        return holder.data if key == "data" else holder[key]

    @staticmethod
    def _set(holder: Any, key: Any, value: torch.Tensor) -> None:
        if key == "data":
            holder.data = value
        else:
            holder[key] = value

    def to_host(self) -> None:
        if self.on_host:
            return
        slots = self._slots()
        tensors = [self._get(h, k) for h, k in slots]
        if self.host is None or [t.shape for t in self.host] != [t.shape for t in tensors]:
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for buffer, t in zip(self.host, tensors, strict=True):
            buffer.copy_(t, non_blocking=True)
        torch.cuda.current_stream().synchronize()  # the buffers are complete before the GPU copies go
        for (h, k), buffer in zip(slots, self.host, strict=True):
            self._set(h, k, buffer)
        self.on_host = True

    def to_device(self) -> None:
        if not self.on_host:
            return
        slots = self._slots()
        for h, k in slots:  # ordered before the next step's kernels on the same stream
            self._set(h, k, self._get(h, k).to("cuda", non_blocking=True))
        self.on_host = False


class MegatronModelOptimizer(ModelOptimizer):
    """DistributedDataParallel + DistributedOptimizer over one model (actor or critic)."""

    def __init__(self, model: torch.nn.Module, cfg: OptimizerConfig, lr: float) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer

        config = model.config
        # The learner's losses are shares of the global-batch loss already: Megatron must sum gradients
        # over data-parallel ranks, not average them (its per-token-loss mode scales by 1).
        config.calculate_per_token_loss = True
        dtype = config.params_dtype
        self.distributed = cfg.optimizer == "adam"  # Megatron's distributed optimizer supports Adam only
        self.ddp = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=self.distributed,
            ),
            module=model,
        )
        self.inner = get_megatron_optimizer(
            MegatronOptimizerConfig(
                optimizer=cfg.optimizer,
                lr=lr,
                min_lr=cfg.min_lr * lr / cfg.lr,
                weight_decay=cfg.weight_decay,
                adam_beta1=cfg.adam_beta1,
                adam_beta2=cfg.adam_beta2,
                adam_eps=cfg.adam_eps,
                sgd_momentum=cfg.sgd_momentum,
                clip_grad=cfg.clip_grad,
                bf16=dtype == torch.bfloat16,
                params_dtype=dtype,
                use_distributed_optimizer=self.distributed,
            ),
            [self.ddp],
        )
        # One optimizer per parameter dtype group, possibly behind a ChainedOptimizer.
        self.parts = list(getattr(self.inner, "chained_optimizers", [self.inner]))
        self.offloads = [PinnedOffload(part.optimizer) for part in self.parts]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.inner.zero_grad()

    def step(self) -> float:
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.ddp])
        if self.inner.config.clip_grad > 0:
            ok, norm, _ = self.inner.step()
        else:  # Megatron computes the norm only to clip: the metric is taken here
            norm = self.inner.get_grad_norm()
            ok, _, _ = self.inner.step()
        if not ok:
            raise FloatingPointError("the optimizer step was skipped: non-finite gradients")
        return float(norm)

    def offload(self) -> None:
        """Master weights and moments to page-locked host memory, gradient buffers freed (views kept):
        between steps in colocated mode the GPU holds only the bf16 model."""
        for moved in self.offloads:
            moved.to_host()
        self.ddp.offload_grad_buffers()
        torch.cuda.empty_cache()

    def reload(self) -> None:
        self.ddp.restore_grad_buffers()
        for moved in self.offloads:
            moved.to_device()

    def state_dict(self) -> dict[str, Any]:
        """This rank's part: each optimizer's settings and (distributed) its shard of master weights and
        moments, which Megatron keeps out of state_dict."""
        parts = []
        for part in self.parts:
            shard = part.get_parameter_state_dp_reshardable() if self.distributed else None
            parts.append({"optimizer": part.state_dict(), "shard": shard})
        return {"parts": parts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["parts"]) != len(self.parts):
            raise ValueError(
                f"optimizer state of {len(state['parts'])} parts, this optimizer has {len(self.parts)}"
            )
        for part, saved in zip(self.parts, state["parts"], strict=True):
            part.load_state_dict(saved["optimizer"])
            own_step_tensors(part.optimizer)
            if saved["shard"] is not None:
                part.load_parameter_state_from_dp_reshardable(unpadded(saved["shard"]))
