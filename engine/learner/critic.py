"""PPO's critic: a Megatron GPTModel of the actor's architecture whose output layer is a value head.

Guarantees: the critic starts from the actor's initial weights with a value head drawn from a fixed
seed (the same on every rank); `values` gives one value per shifted position (the value of the state
that predicts token j + 1, aligned with the log-probs); `step` takes one optimizer step on the clipped
value loss of the global batch, its gradient synchronised like the actor's (engine/learner/optim.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.learner.batching import MicroBatch
from engine.learner.config import AlgoConfig, OptimizerConfig
from engine.learner.loss import aggregate, masked_sum, value_loss
from engine.learner.optim import make_optimizer, make_scheduler, sync_and_clip


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
    ) -> None:
        model.output_layer = ValueHead(hidden, seed)
        self.model, self.algo, self.opt_cfg, self.groups = model, algo, optimizer, groups
        params = dict(model.named_parameters())
        self.tp_partial = [params[n] for n in tp_partial_names if n in params]
        lr = algo.critic_lr or optimizer.lr
        self.optimizer = make_optimizer(model, optimizer, lr)
        self.scheduler = make_scheduler(self.optimizer, optimizer, total_steps, lr)

    def _values(self, mb: MicroBatch) -> torch.Tensor:
        out = self.model(mb.tokens, mb.positions, attention_mask=mb.causal_mask())
        return out[:, :-1, 0].float()

    @torch.no_grad()
    def values(self, micro_batches: list[MicroBatch]) -> None:
        """Set each micro-batch's old_values (the critic before this rollout's steps)."""
        self.model.eval()
        for mb in micro_batches:
            mb.old_values = self._values(mb) * mb.span

    def step(
        self, mbs: list[MicroBatch], *, tokens: float, samples: float
    ) -> tuple[dict[str, float], dict[str, float]]:
        """One optimizer step on the clipped value loss. Returns this rank's loss shares and token sums
        (to be summed over data-parallel ranks) and the metrics already equal on every rank."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        out = {"value_loss": 0.0, "sum/vf_clipfrac": 0.0, "sum/values": 0.0, "sum/returns": 0.0}
        for mb in mbs:
            assert mb.old_values is not None and mb.returns is not None
            values = self._values(mb)
            per_token, clipped = value_loss(values, mb.old_values, mb.returns, self.algo.value_clip)
            loss = aggregate(
                per_token,
                mb.mask,
                per_token_mode=self.algo.calculate_per_token_loss,
                tokens=tokens,
                samples=samples,
            )
            loss.backward()
            out["value_loss"] += float(loss.detach())
            out["sum/vf_clipfrac"] += float(masked_sum(clipped, mb.mask))
            out["sum/values"] += float(masked_sum(values.detach(), mb.mask))
            out["sum/returns"] += float(masked_sum(mb.returns, mb.mask))
        norm = sync_and_clip(
            list(self.model.parameters()),
            tp_partial=self.tp_partial,
            max_norm=self.opt_cfg.clip_grad,
            **self.groups,
        )
        same = {"critic_grad_norm": norm, "critic_lr": self.optimizer.param_groups[0]["lr"]}
        self.optimizer.step()
        self.scheduler.step(1)
        return out, same
