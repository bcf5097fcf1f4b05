"""PPO's critic: a Megatron GPTModel of the actor's architecture whose output layer is a value head.

Guarantees: the critic starts from the actor's initial weights with a value head drawn from a fixed
seed (the same on every rank); `values` gives one value per shifted position (the value of the state
that predicts token j + 1, aligned with the log-probs), in the padded layout for packed micro-batches
too; `step` takes one optimizer step on the clipped value loss of the global batch, its gradient
synchronised like the actor's (engine/learner/optim.py). With pipeline parallelism the value head is on
the last stage, and values and value losses exist there only (engine/learner/pipeline.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.learner.batching import MicroBatch
from engine.learner.config import AlgoConfig, OptimizerConfig
from engine.learner.loss import aggregate, masked_sum, value_loss
from engine.learner.optim import make_optimizer, make_scheduler
from engine.learner.pipeline import Stage, run


class ValueHead(torch.nn.Module):
    """Stands in for GPTModel.output_layer: hidden state -> one value, replicated on TP ranks (the final
    hidden state is whole on every rank), with the output layer's call signature."""

    def __init__(self, hidden: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(1, hidden, generator=generator) / (hidden + 1) ** 0.5)
        self.bias = torch.nn.Parameter(torch.zeros(1))

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
    ) -> tuple[torch.Tensor, None]:
        return F.linear(hidden, self.weight.to(hidden.dtype), self.bias.to(hidden.dtype)), None


class Critic:
    def __init__(
        self,
        model: torch.nn.Module,
        *,
        algo: AlgoConfig,
        optimizer: OptimizerConfig,
        total_steps: int,
        seed: int,
        hidden: int,
        tp_partial_names: list[str],
        groups: dict,
        stage: Stage,
    ) -> None:
        if stage.last:
            where = next(model.parameters())
            model.output_layer = ValueHead(hidden, seed).to(device=where.device, dtype=where.dtype)
        self.model, self.algo, self.opt_cfg, self.groups, self.stage = model, algo, optimizer, groups, stage
        params = dict(model.named_parameters())
        self.tp_partial = [params[n] for n in tp_partial_names if n in params]
        lr = algo.critic_lr or optimizer.lr
        self.optimizer = make_optimizer(model, optimizer, lr, {"tp_partial": self.tp_partial, **groups})
        self.scheduler = make_scheduler(self.optimizer, optimizer, total_steps, lr)

    @staticmethod
    def _values(mb: MicroBatch, output: torch.Tensor) -> torch.Tensor:
        return mb.unpack(mb.predicting(output)[..., 0].float())

    @torch.no_grad()
    def values(self, micro_batches: list[MicroBatch]) -> None:
        """Set each micro-batch's old_values (the critic before this rollout's steps; last stage)."""
        self.model.eval()
        values = run(
            self.model,
            micro_batches,
            lambda mb, out: (None, (self._values(mb, out) * mb.span).cpu()),
            stage=self.stage,
            forward_only=True,
        )
        for mb, v in zip(micro_batches, values, strict=False):
            mb.old_values = v

    def step(
        self, mbs: list[MicroBatch], *, tokens: float, samples: float
    ) -> tuple[dict[str, float], dict[str, float]]:
        """One optimizer step on the clipped value loss. Returns this rank's loss shares and token sums
        (to be summed over data-parallel ranks) and the metrics already equal on every rank."""
        self.model.train()
        self.optimizer.zero_grad()
        out = {"value_loss": 0.0, "sum/vf_clipfrac": 0.0, "sum/values": 0.0, "sum/returns": 0.0}

        def loss_share(mb: MicroBatch, output: torch.Tensor) -> tuple[torch.Tensor, None]:
            assert mb.old_values is not None and mb.returns is not None
            values = self._values(mb, output)
            per_token, clipped = value_loss(values, mb.old_values, mb.returns, self.algo.value_clip)
            loss = aggregate(
                per_token,
                mb.mask,
                per_token_mode=self.algo.calculate_per_token_loss,
                tokens=tokens,
                samples=samples,
            )
            out["value_loss"] += float(loss.detach())
            out["sum/vf_clipfrac"] += float(masked_sum(clipped, mb.mask))
            out["sum/values"] += float(masked_sum(values.detach(), mb.mask))
            out["sum/returns"] += float(masked_sum(mb.returns, mb.mask))
            return loss, None

        run(self.model, mbs, loss_share, stage=self.stage, forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]
        same = {"critic_grad_norm": self.optimizer.step(), "critic_lr": lr}
        self.scheduler.step(1)
        return out, same
