"""One learner rank: a Megatron-core GPTModel, its optimizer, and the RL training step.

Guarantees, for a rollout of samples:
- the old log-probs are the learner's own at the weights it holds when the rollout arrives: the first
  optimizer step takes them from its own forward pass (detached), later steps from a pass made before
  the first step; so the first step's ppo_kl is exactly 0 and no forward pass is spent twice;
- each optimizer step's gradient is the gradient of the global-batch loss (micro-batch shares are
  normalised by global token/sample counts, then summed over micro-batches and data-parallel ranks);
- with context parallelism the ranks of a CP group train on the same samples, each running the model on
  its part of every sequence; per-token results are gathered over the group before any loss or metric
  (engine/learner/batching.py), so losses, metrics and log-probs are those without CP, and gradients are
  summed over data- and context-parallel ranks;
- with pipeline parallelism (engine/learner/pipeline.py) each stage holds its layers, the last stage
  computes log-probs, advantages and losses, and metrics and log-probs reach every stage from it;
- `export_hf` returns, on rank 0, the full model as HF-named tensors (TP shards, the experts of all
  expert-parallel ranks and all pipeline stages gathered, vocabulary padding removed);
- `save_state` / a spec with `resume_from` write and restore the whole rank state exactly
  (engine/learner/checkpoint.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu

from engine.checkpoint import is_iteration
from engine.cluster import gpu_memory, gpu_uuid, pin_to_core
from engine.cuda_ipc import SharedBuckets
from engine.errors import ConfigError
from engine.hf_config import load_hf_config, torch_dtype
from engine.learner import hf_bridge, pipeline
from engine.learner.advantages import assign_advantages
from engine.learner.batching import MicroBatch, chunk, chunk_by_tokens, make_micro_batch, split_rollout
from engine.learner.checkpoint import MODEL, load_learner, load_model, save_learner
from engine.learner.config import LearnerSpec
from engine.learner.context_parallel import ContextGroup
from engine.learner.critic import Critic
from engine.learner.loss import CustomLoss, policy_objective, token_logprobs
from engine.learner.optim import make_optimizer, make_scheduler
from engine.learner.parallel import init_parallel
from engine.learner.weights import load_hf_state
from engine.learner.weights_out import WeightsOut
from engine.wire import Sample


def check_device(params_dtype: str, device: torch.device) -> None:
    """Options that need CUDA fail on the CPU naming the key that asks for them."""
    if device.type != "cuda" and params_dtype != "float32":
        raise ConfigError(
            f"{params_dtype} training keeps fp32 master weights in Megatron's distributed optimizer, which "
            "needs CUDA; the CPU learner trains in float32",
            section="model",
            key="params_dtype",
        )


class LearnerWorker(WeightsOut):
    """A Ray actor per rank (created with `ray.remote(LearnerWorker).options(...)`)."""

    def __init__(self, *, rank: int, world_size: int, master: str, spec: LearnerSpec) -> None:
        pin_to_core(None if spec.first_core is None else spec.first_core + rank)
        torch.set_num_threads(spec.threads)
        torch.manual_seed(spec.seed)
        # On a GPU host each rank sees its own device (Ray sets CUDA_VISIBLE_DEVICES per actor).
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self.rank, self.world_size = rank, world_size
        self.model_cfg, self.ckpt, self.perf, self.algo = spec.model, spec.ckpt, spec.perf, spec.algo
        self.opt_cfg, self.temperature = spec.optimizer, spec.temperature
        check_device(self.model_cfg.params_dtype, self.device)
        self._token_logprobs = torch.compile(token_logprobs) if self.perf.torch_compile else token_logprobs
        model, ckpt, optimizer, total_steps = spec.model, spec.ckpt, spec.optimizer, spec.total_steps
        tp, pp = self.perf.tensor_model_parallel_size, self.perf.pipeline_model_parallel_size
        cp = self.perf.context_parallel_size
        ep = self.perf.expert_model_parallel_size
        init_parallel(rank, world_size, tp, master, spec.seed, pp=pp, ep=ep, cp=cp)
        self.stage, self.pp = pipeline.Stage.current(), pp
        self.tp_group = mpu.get_tensor_model_parallel_group()
        self.dp_group = mpu.get_data_parallel_group()
        self.tp_rank, self.tp = mpu.get_tensor_model_parallel_rank(), tp
        self.dp_rank, self.dp = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
        # Context parallelism: the ranks of a CP group share every sequence (their data is the same).
        self.cp, self.cp_rank = cp, mpu.get_context_parallel_rank()
        self.context = ContextGroup(cp, self.cp_rank, mpu.get_context_parallel_group()) if cp > 1 else None
        # MoE experts: ep ranks hold different experts (ep = 1: every rank holds all of them).
        self.ep_group, self.ep = mpu.get_expert_model_parallel_group(), self.perf.expert_model_parallel_size
        self.ep_rank = mpu.get_expert_model_parallel_rank()

        self.hf_config = load_hf_config(ckpt.hf_checkpoint, model.overrides)
        self.shape = hf_bridge.shape_of(
            self.hf_config, tp=tp, divisible_by=model.make_vocab_size_divisible_by, ep=self.ep
        )
        hf_bridge.layers_per_stage(self.shape, pp)  # a ConfigError unless the layers split evenly
        init = spec.init_from or ckpt.hf_checkpoint
        self.model = self._build(init)
        self.ref_model = None
        if self.algo.needs_reference:
            self.ref_model = self._build(ckpt.ref_load or ckpt.hf_checkpoint)
            self.ref_model.requires_grad_(False)
        params = dict(self.model.named_parameters())
        maps = hf_bridge.stage_param_maps(self.shape, self.stage.rank, pp)
        tp_partial = [p.megatron for p in maps if p.tp_partial_grad]
        self._tp_partial = [params[name] for name in tp_partial]
        # Gradients are summed over the data- and context-parallel ranks (each CP rank's are partial).
        grad_group = mpu.get_data_parallel_group(with_context_parallel=True)
        self._groups = {"tp_group": self.tp_group, "tp": tp, "dp_group": grad_group, "dp": self.dp * cp}
        self._groups.update(
            pp_group=self.stage.group, pp=pp, embd_group=mpu.get_embedding_group(check_initialized=False)
        )
        # Tied embeddings over stages: the first stage's word embeddings and the last stage's copy.
        tied = {0: "embedding.word_embeddings.weight", pp - 1: "output_layer.weight"}.get(self.stage.rank)
        self._tied = [params[tied]] if self.shape.tied and pp > 1 and tied else []
        if self.ep > 1:
            self._groups.update(
                ep_group=self.ep_group,
                ep=self.ep,
                expert_dp_group=mpu.get_expert_data_parallel_group(),
                expert_dp=mpu.get_expert_data_parallel_world_size(),
            )
        sync = {"tp_partial": self._tp_partial, "tied": self._tied, "tied_copy": not self.stage.first}
        self.optimizer = make_optimizer(self.model, optimizer, optimizer.lr, {**sync, **self._groups})
        self.scheduler = make_scheduler(self.optimizer, optimizer, total_steps, optimizer.lr)
        self._shared = SharedBuckets()
        self._held: tuple[int, dict[str, torch.Tensor]] | None = None  # the last broadcast push
        self.critic = None
        if self.algo.needs_critic:
            self.critic = Critic(
                self._build(init),
                algo=self.algo,
                optimizer=optimizer,
                total_steps=total_steps,
                seed=spec.seed,
                hidden=self.shape.hidden,
                tp_partial_names=tp_partial,
                groups=self._groups,
                stage=self.stage,
            )
        self.custom_loss: CustomLoss | None = None
        if self.algo.custom_loss_function_path:
            from engine.rollout.rewards import load_object

            self.custom_loss = load_object(self.algo.custom_loss_function_path)
        if spec.resume_from:
            load_learner(self, Path(spec.resume_from))

    # --- set-up -------------------------------------------------------------------------------------

    def _build(self, weights_from: str) -> torch.nn.Module:
        dtype = torch_dtype(self.model_cfg.params_dtype)
        stage = {"pp_rank": self.stage.rank, "pp": self.pp}
        tconfig = hf_bridge.transformer_config(
            self.hf_config,
            self.shape,
            tp=self.tp,
            params_dtype=dtype,
            pp=self.pp,
            cp=self.perf.context_parallel_size,
            **self.perf.recompute(),
        )
        model = hf_bridge.build_gpt_model(
            self.hf_config, self.shape, tconfig, attention=self.perf.attention_backend, **stage
        )
        if is_iteration(weights_from):  # a checkpoint of this engine: Megatron's format
            load_model(model, Path(weights_from) / MODEL)
        else:
            hf_bridge.load_hf_weights(
                model, load_hf_state(weights_from), self.shape, self.tp_rank, self.tp, self.ep_rank, **stage
            )
        if self.device.type == "cuda":
            # Every parameter on the GPU and in the training dtype, as Megatron's Float16Module: the local
            # spec makes its RMSNorm weights on the CPU in float32 (torch.nn.RMSNorm ignores Megatron's
            # device settings), which would also keep bf16 activations off torch's fused norm kernel.
            model = model.to(device=self.device, dtype=dtype)
        if self.perf.torch_compile:
            for layer in model.decoder.layers:
                layer.compile()
        return model

    def ready(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "tp_rank": self.tp_rank,
            "dp_rank": self.dp_rank,
            "pp_rank": self.stage.rank,
            "cp_rank": self.cp_rank,
            "params": self.num_params(),
            "recompute": self.model.config.recompute_granularity,
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype),
            "optimizer": type(self.optimizer).__name__,
            "gpu_uuid": gpu_uuid(),
        }

    def sleep(self) -> None:
        """Colocated mode, before rollout: optimizer state to the host, gradient buffers and cached blocks
        freed (the model's weights stay: they are what the engines receive)."""
        self.optimizer.offload()
        if self.critic is not None:
            self.critic.optimizer.offload()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Undo sleep before training."""
        self.optimizer.reload()
        if self.critic is not None:
            self.critic.optimizer.reload()

    def memory(self, reset: bool = False) -> dict[str, float]:
        """This rank's GPU memory (engine.cluster.gpu_memory; {} on the CPU)."""
        return gpu_memory(reset) if self.device.type == "cuda" else {}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # --- forward ------------------------------------------------------------------------------------

    def _logprobs(
        self, mb: MicroBatch, output: torch.Tensor, *, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropies) of mb's targets from the model's logits, in the padded shifted layout
        whether packed or not."""
        logits = mb.predicting(output)[..., : self.shape.vocab]
        logp, entropy = self._token_logprobs(
            logits, mb.model_targets(), self.temperature, with_entropy=with_entropy
        )
        return mb.unpack(logp), None if entropy is None else mb.unpack(entropy)

    def _run(
        self, model: torch.nn.Module, mbs: list[MicroBatch], fn: pipeline.StepFn, *, forward_only: bool
    ) -> list:
        """fn(mb, model output) for each micro-batch, through the pipeline stages if there are several."""
        return pipeline.run(model, mbs, fn, stage=self.stage, forward_only=forward_only)

    @torch.no_grad()
    def _forward_logprobs(self, model: torch.nn.Module, mbs: list[MicroBatch]) -> list[torch.Tensor]:
        """Each micro-batch's log-probs (on the CPU, where micro-batches are kept) on the last pipeline
        stage ([] on the others)."""
        model.eval()
        return self._run(
            model, mbs, lambda mb, out: (None, self._logprobs(mb, out)[0].cpu()), forward_only=True
        )

    def _recompute_old(self, micro_batches: list[MicroBatch]) -> None:
        for mb, logp in zip(micro_batches, self._forward_logprobs(self.model, micro_batches), strict=False):
            mb.old_logp = logp

    def _recompute_ref(self, micro_batches: list[MicroBatch]) -> None:
        assert self.ref_model is not None
        for mb, logp in zip(
            micro_batches, self._forward_logprobs(self.ref_model, micro_batches), strict=False
        ):
            mb.ref_logp = logp

    def compute_logprobs(self, samples: list[Sample]) -> list[np.ndarray]:
        """The learner's log-probs of each sample's response tokens at the current weights."""
        mbs = [make_micro_batch(samples[i : i + 1], [i], cp=self.context) for i in range(len(samples))]
        out = []
        for logp, x in zip(self._forward_logprobs(self.model, mbs), samples, strict=False):
            p = len(x.prompt_array)
            out.append(logp[0, p - 1 : p - 1 + x.response_len].numpy().copy())
        return pipeline.from_last_stage(out, self.stage)

    # --- training -----------------------------------------------------------------------------------

    def train(self, samples: list[Sample], num_steps: int) -> list[dict[str, float]]:
        """Train on one rollout (num_steps optimizer steps); returns per-step metrics, equal on all ranks."""
        t0 = time.perf_counter()
        plan = split_rollout(len(samples), num_steps, self.dp_rank, self.dp)
        global_per_step = len(samples) // num_steps
        steps = [self._micro_batches(samples, indices) for indices in plan]
        # KL reward shaping needs the old log-probs before any step; otherwise the first step's forward
        # runs at these very weights on these very micro-batches, and its own log-probs (detached) are
        # the old log-probs: no separate pass for them.
        early_old = self.algo.kl_coef > 0
        for step, mbs in enumerate(steps):
            if self.algo.use_rollout_logprobs:
                for mb in mbs:
                    mb.old_logp = mb.rollout_logp
            elif step > 0 or early_old:
                self._recompute_old(mbs)
            if self.ref_model is not None:
                self._recompute_ref(mbs)
            if self.critic is not None:
                self.critic.values(mbs)
        rewards = torch.tensor([x.reward for x in samples], dtype=torch.float32)
        group_ids = torch.tensor([x.group_id for x in samples])
        if self.stage.last:  # only the last pipeline stage computes losses (its data-parallel group sums)
            all_mbs = [mb for mbs in steps for mb in mbs]
            assign_advantages(self.algo, all_mbs, rewards, group_ids, self._dp_sum)
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

    def _micro_batches(self, samples: list[Sample], indices: list[int]) -> list[MicroBatch]:
        """One step's micro-batches: micro_batch_size samples each, padded; or, with dynamic batching, by
        token budget, each packed into one row."""
        if not self.perf.use_dynamic_batch_size:
            parts = chunk(indices, self.perf.micro_batch_size)
            # Expert-parallel ranks all-gather their tokens in every MoE layer: equal shapes on all ranks.
            pad = max(len(x.prompt_array) + x.response_len for x in samples) if self.ep > 1 else None
            return [
                make_micro_batch([samples[i] for i in part], part, pad_to=pad, cp=self.context)
                for part in parts
            ]
        assert self.perf.max_tokens_per_gpu is not None
        lengths = [len(samples[i].prompt_array) + samples[i].response_len for i in indices]
        parts = chunk_by_tokens(indices, lengths, self.perf.max_tokens_per_gpu)
        return [
            make_micro_batch([samples[i] for i in part], part, packed=True, cp=self.context) for part in parts
        ]

    def _dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.dp > 1:
            on_device = t.to(self.device, copy=True)
            dist.all_reduce(on_device, group=self.dp_group)
            t = on_device.to(t.device)
        return t

    def _optimizer_step(self, mbs: list[MicroBatch], *, tokens: float, samples: float) -> dict[str, float]:
        t0 = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad()
        shares: dict[str, float] = {}
        sums: dict[str, float] = {"entropy": 0.0, "advantages": 0.0}

        def loss_share(mb: MicroBatch, output: torch.Tensor) -> tuple[torch.Tensor, None]:
            assert mb.advantages is not None
            logp, entropy = self._logprobs(mb, output, with_entropy=True)
            if mb.old_logp is None:  # the rollout's first optimizer step
                mb.old_logp = logp.detach()
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
                custom_loss=self.custom_loss,
            )
            sums["entropy"] += float((entropy.detach() * mb.mask).sum())
            sums["advantages"] += float((mb.advantages * mb.mask).sum())
            for k, v in mb_shares.items():
                shares[k] = shares.get(k, 0.0) + float(v)
            for k, v in mb_sums.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            return loss, None

        self._run(self.model, mbs, loss_share, forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]
        same = {"grad_norm": self.optimizer.step(), "lr": lr}
        self.scheduler.step(1)
        if self.critic is not None:
            critic_shares, critic_same = self.critic.step(mbs, tokens=tokens, samples=samples)
            same.update(critic_same)
            for k, v in critic_shares.items():
                if k.startswith("sum/"):
                    sums[k[4:]] = v
                else:
                    shares[k] = v
        reduced = self._allreduce_stats({**shares, **{f"sum/{k}": v for k, v in sums.items()}})
        reduced = pipeline.from_last_stage(reduced, self.stage)  # losses are the last stage's
        out = {k: v for k, v in reduced.items() if not k.startswith("sum/")}
        out.update({k[4:]: v / max(tokens, 1.0) for k, v in reduced.items() if k.startswith("sum/")})
        out.update(same)
        out["train_time"] = time.perf_counter() - t0
        return out

    def _allreduce_stats(self, stats: dict[str, float]) -> dict[str, float]:
        keys = sorted(stats)
        t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.device)
        if self.dp > 1:
            dist.all_reduce(t, group=self.dp_group)
        return dict(zip(keys, t.tolist(), strict=True))

    # --- checkpoints -------------------------------------------------------------------------------

    def save_state(self, path: str) -> None:
        """Write this rank's state into an iteration directory (every rank must call this)."""
        save_learner(self, Path(path))
