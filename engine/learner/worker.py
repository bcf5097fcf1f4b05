"""One learner rank: a Megatron-core GPTModel, its optimizer, and the RL training step.

Guarantees, for a rollout of samples:
- log-probs before the first optimizer step are recomputed with the same micro-batches the step uses,
  so the first step's ppo_kl is exactly 0;
- each optimizer step's gradient is the gradient of the global-batch loss (micro-batch shares are
  normalised by global token/sample counts, then summed over micro-batches and data-parallel ranks);
- `export_hf` returns, on rank 0, the full model as HF-named tensors (TP shards gathered, vocabulary
  padding removed).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from engine.cluster import pin_to_core
from engine.hf_config import load_hf_config, torch_dtype
from engine.learner import hf_bridge
from engine.learner.batching import MicroBatch, chunk, make_micro_batch, split_rollout
from engine.learner.config import LearnerSpec
from engine.learner.loss import grpo_advantages, policy_objective, token_logprobs
from engine.learner.parallel import init_parallel
from engine.learner.weights import load_hf_state, save_hf_checkpoint
from engine.wire import Sample


def allreduce_sum(tensors: list[torch.Tensor], group: Any) -> None:
    """In-place sum of tensors across a process group, as one flat collective."""
    if not tensors:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    for t, synced in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors), strict=True):
        t.copy_(synced)


class LearnerWorker:
    """A Ray actor per rank (created with `ray.remote(LearnerWorker).options(...)`)."""

    def __init__(self, *, rank: int, world_size: int, master: str, spec: LearnerSpec) -> None:
        pin_to_core(None if spec.first_core is None else spec.first_core + rank)
        torch.set_num_threads(spec.threads)
        torch.manual_seed(spec.seed)
        self.rank, self.world_size = rank, world_size
        self.model_cfg, self.ckpt, self.perf, self.algo = spec.model, spec.ckpt, spec.perf, spec.algo
        self.opt_cfg, self.temperature = spec.optimizer, spec.temperature
        model, ckpt, optimizer, total_steps = spec.model, spec.ckpt, spec.optimizer, spec.total_steps
        tp = self.perf.tensor_model_parallel_size
        init_parallel(rank, world_size, tp, master, spec.seed)
        self.tp_group = mpu.get_tensor_model_parallel_group()
        self.dp_group = mpu.get_data_parallel_group()
        self.tp_rank, self.tp = mpu.get_tensor_model_parallel_rank(), tp
        self.dp_rank, self.dp = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()

        self.hf_config = load_hf_config(ckpt.hf_checkpoint, model.overrides)
        self.shape = hf_bridge.shape_of(
            self.hf_config, tp=tp, divisible_by=model.make_vocab_size_divisible_by
        )
        self.model = self._build(ckpt.load or ckpt.hf_checkpoint)
        self.ref_model = None
        if self.algo.needs_reference:
            self.ref_model = self._build(ckpt.ref_load or ckpt.hf_checkpoint)
            self.ref_model.requires_grad_(False)
        params = dict(self.model.named_parameters())
        self._tp_partial = [params[p.megatron] for p in hf_bridge.param_maps(self.shape) if p.tp_partial_grad]
        self.optimizer = self._make_optimizer()
        optimizer.check_schedule(total_steps)
        decay_steps = optimizer.decay_steps(total_steps)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if optimizer.lr_warmup_iters else optimizer.lr,
            max_lr=optimizer.lr,
            min_lr=optimizer.min_lr,
            lr_warmup_steps=optimizer.lr_warmup_iters,
            lr_decay_steps=max(decay_steps, optimizer.lr_warmup_iters + 1),
            lr_decay_style=optimizer.lr_decay_style,
            start_wd=optimizer.weight_decay,
            end_wd=optimizer.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
        )

    # --- set-up -------------------------------------------------------------------------------------

    def _build(self, weights_from: str) -> torch.nn.Module:
        dtype = torch_dtype(self.model_cfg.params_dtype)
        tconfig = hf_bridge.transformer_config(self.hf_config, self.shape, tp=self.tp, params_dtype=dtype)
        model = hf_bridge.build_gpt_model(self.hf_config, self.shape, tconfig)
        hf_bridge.load_hf_weights(model, load_hf_state(weights_from), self.shape, self.tp_rank, self.tp)
        return model

    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim <= 1]
        groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
        c = self.opt_cfg
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.lr, momentum=c.sgd_momentum)
        return torch.optim.AdamW(groups, lr=c.lr, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps)

    def ready(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "tp_rank": self.tp_rank,
            "dp_rank": self.dp_rank,
            "params": self.num_params(),
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # --- forward ------------------------------------------------------------------------------------

    def _logits(self, model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
        logits = model(mb.tokens, mb.positions, attention_mask=mb.causal_mask())
        return logits[:, :-1, : self.shape.vocab]

    @torch.no_grad()
    def _recompute_old(self, micro_batches: list[MicroBatch]) -> None:
        self.model.eval()
        for mb in micro_batches:
            mb.old_logp, _ = token_logprobs(self._logits(self.model, mb), mb.targets, self.temperature)

    @torch.no_grad()
    def _recompute_ref(self, micro_batches: list[MicroBatch]) -> None:
        assert self.ref_model is not None
        self.ref_model.eval()
        for mb in micro_batches:
            mb.ref_logp, _ = token_logprobs(self._logits(self.ref_model, mb), mb.targets, self.temperature)

    def compute_logprobs(self, samples: list[Sample]) -> list[np.ndarray]:
        """The learner's log-probs of each sample's response tokens at the current weights."""
        mbs = [make_micro_batch(samples[i : i + 1], [0.0]) for i in range(len(samples))]
        self._recompute_old(mbs)
        out = []
        for mb, x in zip(mbs, samples, strict=True):
            p = len(x.prompt_array)
            assert mb.old_logp is not None
            out.append(mb.old_logp[0, p - 1 : p - 1 + x.response_len].numpy().copy())
        return out

    # --- training -----------------------------------------------------------------------------------

    def train(self, samples: list[Sample], num_steps: int) -> list[dict[str, float]]:
        """Train on one rollout (num_steps optimizer steps); returns per-step metrics, equal on all ranks."""
        t0 = time.perf_counter()
        rewards = torch.tensor([x.reward for x in samples], dtype=torch.float32)
        group_ids = torch.tensor([x.group_id for x in samples])
        advantages = grpo_advantages(rewards, group_ids, std_normalize=self.algo.grpo_std_normalization)
        plan = split_rollout(len(samples), num_steps, self.dp_rank, self.dp)
        global_per_step = len(samples) // num_steps
        steps = []
        for indices in plan:
            mbs = [
                make_micro_batch([samples[i] for i in part], [float(advantages[i]) for i in part])
                for part in chunk(indices, self.perf.micro_batch_size)
            ]
            steps.append(mbs)
        for mbs in steps:
            if self.algo.use_rollout_logprobs:
                for mb in mbs:
                    mb.old_logp = mb.rollout_logp
            else:
                self._recompute_old(mbs)
            if self.ref_model is not None:
                self._recompute_ref(mbs)
        recompute_s = time.perf_counter() - t0
        metrics = []
        for step, mbs in enumerate(steps):
            start = step * global_per_step
            step_samples = samples[start : start + global_per_step]
            tokens = float(sum(int(x.mask_array.sum()) for x in step_samples))
            metrics.append(self._optimizer_step(mbs, tokens=tokens, samples=float(len(step_samples))))
        for m in metrics:
            m["recompute_time"] = recompute_s / len(metrics)
        return metrics

    def _optimizer_step(self, mbs: list[MicroBatch], *, tokens: float, samples: float) -> dict[str, float]:
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        shares: dict[str, float] = {}
        sums: dict[str, float] = {"entropy": 0.0}
        for mb in mbs:
            assert mb.old_logp is not None
            logp, entropy = token_logprobs(
                self._logits(self.model, mb), mb.targets, self.temperature, with_entropy=True
            )
            assert entropy is not None
            if not self.algo.entropy_coef:
                entropy = entropy.detach()  # a metric only: no gradient through it
            loss, mb_shares, mb_sums = policy_objective(
                self.algo,
                logp=logp,
                old_logp=mb.old_logp,
                rollout_logp=mb.rollout_logp,
                advantages=mb.advantages,
                mask=mb.mask,
                entropy=entropy,
                ref_logp=mb.ref_logp,
                tokens=tokens,
                samples=samples,
            )
            loss.backward()
            sums["entropy"] += float((entropy.detach() * mb.mask).sum())
            for k, v in mb_shares.items():
                shares[k] = shares.get(k, 0.0) + float(v)
            for k, v in mb_sums.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        self._reduce_tp_partial_grads()
        self._allreduce_grads()
        grad_norm = self._clip_grads(self.opt_cfg.clip_grad)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step(1)
        reduced = self._allreduce_stats({**shares, **{f"sum/{k}": v for k, v in sums.items()}})
        out = {k: v for k, v in reduced.items() if not k.startswith("sum/")}
        out.update({k[4:]: v / max(tokens, 1.0) for k, v in reduced.items() if k.startswith("sum/")})
        out["grad_norm"] = grad_norm
        out["lr"] = lr
        out["train_time"] = time.perf_counter() - t0
        return out

    def _reduce_tp_partial_grads(self) -> None:
        """Sum over TP ranks the gradients of replicated parameters each rank applies to its own heads
        only (QK norms), as Megatron does, so every rank takes the same step."""
        if self.tp > 1:
            allreduce_sum([p.grad for p in self._tp_partial if p.grad is not None], self.tp_group)

    def _allreduce_grads(self) -> None:
        if self.dp > 1:
            allreduce_sum([p.grad for p in self.model.parameters() if p.grad is not None], self.dp_group)

    def _clip_grads(self, max_norm: float) -> float:
        """Global L2 norm over the full model (TP shards counted once) and clipping to max_norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        sq = torch.zeros(1, dtype=torch.float64)
        for p in params:
            if param_is_not_tensor_parallel_duplicate(p):
                sq += p.grad.detach().double().square().sum()
        if self.tp > 1:
            dist.all_reduce(sq, group=self.tp_group)
        norm = float(sq.sqrt())
        if max_norm > 0 and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for p in params:
                p.grad.mul_(scale)
        return norm

    def _allreduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        keys = sorted(stats)
        t = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
        if self.dp > 1:
            dist.all_reduce(t, group=self.dp_group)
        return dict(zip(keys, t.tolist(), strict=True))

    # --- weights out --------------------------------------------------------------------------------

    @torch.no_grad()
    def export_hf(self) -> dict[str, torch.Tensor] | None:
        """Full HF-named weights on global rank 0 (every rank must call this)."""
        params = dict(self.model.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for p in hf_bridge.param_maps(self.shape):
            local = params[p.megatron].detach().contiguous()
            if self.tp > 1:
                shards = [torch.empty_like(local) for _ in range(self.tp)]
                dist.all_gather(shards, local, group=self.tp_group)
            else:
                shards = [local]
            if self.rank == 0:
                for name, tensor in zip(p.hf, hf_bridge.to_hf(p, shards, self.shape), strict=True):
                    out[name] = tensor.clone()
        return out if self.rank == 0 else None

    def save_hf(self, path: str) -> str | None:
        """Write an HF checkpoint of the current weights (rank 0 writes; every rank must call this)."""
        tensors = self.export_hf()
        if self.rank != 0:
            return None
        assert tensors is not None
        return str(save_hf_checkpoint(tensors, self.hf_config, self.ckpt.hf_checkpoint, path))
