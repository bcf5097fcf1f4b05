"""Micro-batches through a learner model split over pipeline stages (Megatron's 1F1B schedule).

Guarantees, for a model of this rank's pipeline stage and the same micro-batches on every stage of a
pipeline:
- `run` calls fn(mb, output) on the last stage for each micro-batch, in order, where output is what the
  whole model returns for mb (the stages pass hidden states point to point, each one's shape sent ahead
  of it since micro-batches differ in length); it returns fn's results there and [] on other stages;
- unless forward_only, the gradient of the sum of the losses fn returns is accumulated into every stage's
  parameters, unscaled: the losses are already shares of the global-batch loss, so the schedule's
  division by the number of micro-batches is switched off;
- with one stage, `run` is the plain loop: forward, fn, backward, one micro-batch after another;
- `from_last_stage` hands every stage the last stage's value; `gather_to_rank0` merges dicts on rank 0.

On CPU with gloo the schedule's "cuda" tensors are made on the CPU (engine/learner/device_shim.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

from engine.learner.batching import MicroBatch
from engine.learner.device_shim import cuda_as_cpu

T = TypeVar("T")
# fn(mb, output) -> (loss share to back-propagate, or None when forward only; a result to keep)
StepFn = Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor | None, T]]


@dataclass(frozen=True)
class Stage:
    """This rank's place in its pipeline."""

    rank: int
    size: int
    group: Any  # the pipeline-parallel process group
    last_rank: int  # global rank of the last stage of this pipeline

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    @classmethod
    def current(cls) -> Stage:
        """From Megatron's parallel state (after init_parallel)."""
        return cls(
            rank=mpu.get_pipeline_model_parallel_rank(),
            size=mpu.get_pipeline_model_parallel_world_size(),
            group=mpu.get_pipeline_model_parallel_group(),
            last_rank=mpu.get_pipeline_model_parallel_last_rank(),
        )


def run(
    model: torch.nn.Module, mbs: list[MicroBatch], fn: StepFn[T], *, stage: Stage, forward_only: bool
) -> list[T]:
    """fn on each micro-batch's model output (last stage), with backward unless forward_only. fn gets a
    copy of each micro-batch on the model's device."""
    device = next(model.parameters()).device
    mbs = [mb.to(device) for mb in mbs]
    results: list[T] = []
    if stage.size == 1:
        for mb in mbs:
            loss, result = fn(mb, model(**mb.model_inputs()))
            if not forward_only:
                assert loss is not None
                loss.backward()
            results.append(result)
        return results

    from megatron.core.pipeline_parallel import get_forward_backward_func

    one = torch.ones((), dtype=torch.int)

    def forward_step(data: Iterator[MicroBatch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        mb = next(data)

        def loss_func(output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
            loss, result = fn(mb, output)
            results.append(result)
            # Megatron's (loss, num_tokens, reduced) form; with calculate_per_token_loss it scales nothing.
            return (output.new_zeros(()) if loss is None else loss), one, None

        return model(**mb.model_inputs()), loss_func

    # Micro-batches differ in length: the stages send each one's shape ahead of it. The losses are shares
    # of the global loss already: Megatron's per-token mode leaves them unscaled.
    config = model.config
    saved = config.variable_seq_lengths, config.calculate_per_token_loss
    config.variable_seq_lengths = config.calculate_per_token_loss = True
    try:
        with cuda_as_cpu():
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(mbs),
                model=model,
                num_microbatches=len(mbs),
                seq_length=mbs[0].tokens.shape[1],  # unused: variable_seq_lengths sends every shape
                micro_batch_size=mbs[0].tokens.shape[0],
                forward_only=forward_only,
            )
    finally:
        config.variable_seq_lengths, config.calculate_per_token_loss = saved
    return results


def from_last_stage(value: T, stage: Stage) -> T:
    """The last stage's value on every stage of the pipeline (picklable values)."""
    if stage.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=stage.last_rank, group=stage.group)
    return box[0]


def gather_to_rank0(part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Every rank's dict merged on global rank 0 (None elsewhere); every rank must call this."""
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(part, parts, dst=0)
    if parts is None:
        return None
    return {k: v for p in parts for k, v in p.items()}
