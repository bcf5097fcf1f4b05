"""Config sections owned by the learner: [model], [ckpt], [perf], [algo] and [optimizer]."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from engine.configbase import Section


class ModelConfig(Section, kw_only=True):
    """[model]: architecture comes from the HF config.json; these keys adjust how it is built."""

    section_name = "model"

    params_dtype: Literal["float32", "bfloat16"] = "float32"
    make_vocab_size_divisible_by: int = 128
    # HF config fields replaced before learner and engines build the model (e.g. rope_theta).
    overrides: dict[str, Any] = msgspec.field(default_factory=dict)

    def check(self) -> None:
        # bfloat16 needs CUDA (fp32 master weights in Megatron's optimizer): the learner checks on start.
        self.positive("make_vocab_size_divisible_by")


class CkptConfig(Section, kw_only=True):
    """[ckpt]: where weights come from and go to (slime's CKPT_ARGS group; docs/checkpoints.md).

    hf_checkpoint gives tokenizer and architecture, and the initial weights when nothing else does.
    ref_load (default: hf_checkpoint; an HF directory or a checkpoint written to `save`) gives the
    reference model and the initial actor weights when `load` holds no checkpoint. load is the resume
    directory (normally equal to save): when its `latest` names a complete iteration, the run continues
    from it. save receives save/iter_NNNNNNN/ every save_interval rollout steps and at the end.
    """

    section_name = "ckpt"

    hf_checkpoint: str
    ref_load: str | None = None
    load: str | None = None
    save: str | None = None
    save_interval: int | None = None
    save_hf: bool = True  # also write the actor as an HF checkpoint in save/iter_NNNNNNN/hf

    def check(self) -> None:
        self.positive("save_interval")
        if self.save_interval is not None:
            self.require(self.save is not None, "save_interval", "is set but ckpt.save (a directory) is not")


class PerfConfig(Section, kw_only=True):
    """[perf]: Megatron parallelism and micro-batching (slime's PERF_ARGS group)."""

    section_name = "perf"

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    # Core attention: "sdpa" (torch's fused kernels, packed sequences) or "local" (Megatron's unfused).
    attention_backend: Literal["sdpa", "local"] = "sdpa"
    # Cut each rank's share of a step into packed micro-batches of at most max_tokens_per_gpu tokens.
    use_dynamic_batch_size: bool = False
    max_tokens_per_gpu: int | None = None
    # Activation recomputation (Megatron's): none, every layer's whole forward ("full"; by "uniform"
    # chunks of recompute_num_layers layers or the first recompute_num_layers of a stage: "block"), or
    # core attention only ("selective").
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    # torch.compile each transformer layer and the log-prob function (fuses norms, RoPE, SwiGLU and casts;
    # meant for CUDA: the first steps of each new shape pay the compilation).
    torch_compile: bool = False

    def check(self) -> None:
        self.positive("recompute_num_layers")
        if self.recompute_granularity == "full":
            for key in ("recompute_method", "recompute_num_layers"):
                self.require(
                    getattr(self, key) is not None, key, "is required with recompute_granularity = 'full'"
                )
        else:
            for key in ("recompute_method", "recompute_num_layers"):
                self.require(
                    getattr(self, key) is None,
                    key,
                    f"applies to recompute_granularity = 'full' only (it is {self.recompute_granularity!r})",
                )
        self.positive(
            "tensor_model_parallel_size",
            "micro_batch_size",
            "max_tokens_per_gpu",
            "expert_model_parallel_size",
        )
        if self.use_dynamic_batch_size:
            self.require(
                self.max_tokens_per_gpu is not None,
                "max_tokens_per_gpu",
                "is required with use_dynamic_batch_size = true (the token budget of a micro-batch)",
            )
            self.require(
                self.attention_backend == "sdpa",
                "attention_backend",
                "use_dynamic_batch_size packs sequences, which only the 'sdpa' backend supports",
            )
        self.require(
            self.expert_model_parallel_size == 1 or not self.use_dynamic_batch_size,
            "expert_model_parallel_size",
            "> 1 needs equal micro-batch shapes on all ranks: use_dynamic_batch_size = false",
        )
        self.positive("pipeline_model_parallel_size")
        self.positive("context_parallel_size")
        if self.context_parallel_size > 1:
            self.require(
                self.attention_backend == "sdpa",
                "context_parallel_size",
                "> 1 runs in the 'sdpa' attention backend only (perf.attention_backend)",
            )
            self.require(
                self.expert_model_parallel_size == 1,
                "context_parallel_size",
                "> 1 is not supported together with expert_model_parallel_size > 1 yet",
            )
        self.require(
            not self.sequence_parallel,
            "sequence_parallel",
            "needs Transformer Engine or Apex norms, which are not installed",
        )

    def recompute(self) -> dict[str, Any]:
        """The TransformerConfig fields of the recompute options (empty when off)."""
        if self.recompute_granularity is None:
            return {}
        return {
            "recompute_granularity": self.recompute_granularity,
            "recompute_method": self.recompute_method,
            "recompute_num_layers": self.recompute_num_layers,
        }


class AlgoConfig(Section, kw_only=True):
    """[algo]: the RL objective (slime's GRPO_ARGS group; formulas in docs/algorithms.md)."""

    section_name = "algo"

    advantage_estimator: Literal[
        "grpo", "gspo", "cispo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"
    ] = "grpo"
    # Group estimators: subtract the group's mean reward, divide by its std.
    rewards_normalization: bool = True
    grpo_std_normalization: bool = True
    # Whiten advantages over the rollout's tokens (None: on for reinforce_plus_plus* and ppo, else off).
    advantage_whitening: bool | None = None
    gamma: float = 1.0
    lambd: float = 0.95
    # ppo's critic: a copy of the initial actor with a value head; its own learning rate (default: lr).
    critic_lr: float | None = None
    value_clip: float | None = 0.2
    loss_type: Literal["policy_loss", "sft", "custom_loss"] = "policy_loss"
    custom_loss_function_path: str | None = None
    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    eps_clip_c: float | None = None
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.0
    kl_loss_type: Literal["k1", "k2", "k3", "low_var_kl"] = "low_var_kl"
    kl_coef: float = 0.0  # KL reward shaping (a penalty in the reward, not a loss term)
    entropy_coef: float = 0.0
    calculate_per_token_loss: bool = False
    use_tis: bool = False
    tis_mode: Literal["token_truncate", "token_mask", "seq_truncate", "seq_mask"] = "token_truncate"
    tis_clip: float = 2.0
    tis_clip_low: float = 0.0
    use_rollout_logprobs: bool = False

    def check(self) -> None:
        self.positive("eps_clip", "eps_clip_high", "tis_clip", "critic_lr", "value_clip")
        for key in ("eps_clip", "eps_clip_high"):
            value = getattr(self, key)
            self.require(value is None or value < 1.0, key, f"a clip range must be below 1, got {value}")
        self.require(
            not (self.use_tis and self.use_rollout_logprobs),
            "use_tis",
            "with use_rollout_logprobs the old log-probs are the engine's, so TIS weights would all be 1",
        )
        self.non_negative("kl_loss_coef", "entropy_coef", "tis_clip_low", "kl_coef")
        for key in ("gamma", "lambd"):
            value = getattr(self, key)
            self.require(0.0 <= value <= 1.0, key, f"must be in [0, 1], got {value}")
        if self.eps_clip_c is not None:
            self.require(
                self.eps_clip_c > 1.0, "eps_clip_c", f"dual-clip constant must be > 1, got {self.eps_clip_c}"
            )
        self.require(
            self.tis_clip_low <= self.tis_clip,
            "tis_clip_low",
            f"tis_clip_low={self.tis_clip_low} is above tis_clip={self.tis_clip}",
        )
        self.require(
            self.kl_loss_coef == 0.0 or self.use_kl_loss,
            "kl_loss_coef",
            f"is {self.kl_loss_coef} but use_kl_loss is false; set algo.use_kl_loss = true",
        )
        self.require(
            not (self.use_kl_loss and self.kl_coef > 0),
            "kl_coef",
            "KL reward shaping (kl_coef) and the KL loss (use_kl_loss) penalise the same divergence twice; "
            "use one of them",
        )
        self.require(
            (self.loss_type == "custom_loss") == (self.custom_loss_function_path is not None),
            "custom_loss_function_path",
            "is needed exactly when loss_type = 'custom_loss' (loss_type = "
            f"{self.loss_type!r}, custom_loss_function_path = {self.custom_loss_function_path!r})",
        )
        self.require(
            not (self.loss_type == "sft" and self.use_tis),
            "use_tis",
            "importance weights correct a policy-gradient loss; loss_type = 'sft' has none",
        )

    @property
    def needs_reference(self) -> bool:
        return self.use_kl_loss or self.kl_coef > 0

    @property
    def needs_critic(self) -> bool:
        return self.advantage_estimator == "ppo"

    @property
    def policy_loss_kind(self) -> str:
        """The per-token policy term: 'gspo' and 'cispo' have their own, every other estimator PPO's."""
        return self.advantage_estimator if self.advantage_estimator in ("gspo", "cispo") else "ppo"

    @property
    def token_level(self) -> bool:
        """Whether advantages are built per token (returns, GAE) rather than per sample from its group."""
        return self.advantage_estimator in ("reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo")

    @property
    def whiten(self) -> bool:
        return self.token_level if self.advantage_whitening is None else self.advantage_whitening


class OptimizerConfig(Section, kw_only=True):
    """[optimizer]: optimizer and learning-rate schedule (slime's OPTIMIZER_ARGS group)."""

    section_name = "optimizer"

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.0
    clip_grad: float = 1.0

    def check(self) -> None:
        self.positive("lr", "lr_decay_iters", "adam_eps")
        self.non_negative("min_lr", "lr_warmup_iters", "weight_decay", "clip_grad", "sgd_momentum")
        self.require(self.min_lr <= self.lr, "min_lr", f"min_lr={self.min_lr} is above lr={self.lr}")
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            self.require(0.0 <= value < 1.0, key, f"must be in [0, 1), got {value}")

    def decay_steps(self, total_steps: int) -> int:
        """Optimizer steps of the decay: lr_decay_iters, else the whole run."""
        return self.lr_decay_iters or max(total_steps, 1)

    def check_schedule(self, total_steps: int) -> None:
        """The schedule must fit the run (Megatron's scheduler needs warm-up shorter than the decay)."""
        decay = self.decay_steps(total_steps)
        self.require(
            self.lr_decay_style == "constant" or self.lr_warmup_iters < decay,
            "lr_warmup_iters",
            f"{self.lr_warmup_iters} warm-up steps do not fit in a {self.lr_decay_style} decay of "
            f"{decay} steps (optimizer.lr_decay_iters, by default "
            "rollout.num_rollout x rollout.num_steps_per_rollout)",
        )


class LearnerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a learner rank needs: its config sections and the run facts it cannot derive."""

    model: ModelConfig
    ckpt: CkptConfig
    perf: PerfConfig
    algo: AlgoConfig
    optimizer: OptimizerConfig
    temperature: float  # rollout sampling temperature: the learner's log-probs use the same
    total_steps: int  # optimizer steps of the run (the learning-rate schedule's length)
    seed: int
    threads: int
    first_core: int | None = None  # pin rank r to core first_core + r (None: no pinning)
    # The actor's initial weights: an HF directory or an iteration directory of a checkpoint (the
    # launcher resolves ckpt.load / ckpt.ref_load into it; None: ckpt.hf_checkpoint).
    init_from: str | None = None
    resume_from: str | None = None  # iteration directory to restore the whole learner state from
