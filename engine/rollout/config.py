"""Config sections owned by the rollout side: [rollout], [eval] and [inference]."""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from engine.configbase import Section
from engine.rollout.rewards.verifiers import REMOTE, name_problem


class RolloutConfig(Section, kw_only=True):
    """[rollout]: prompt data, batch sizes, sampling and reward (slime's ROLLOUT_ARGS group)."""

    section_name = "rollout"

    # Data.
    prompt_data: str
    input_key: str = "input"
    label_key: str | None = "label"
    metadata_key: str = "metadata"
    apply_chat_template: bool = False
    shuffle: bool = True
    seed: int = 42
    # Batch sizes: batch_size x n_samples_per_prompt = global_batch_size x num_steps_per_rollout.
    batch_size: int
    n_samples_per_prompt: int = 1
    global_batch_size: int | None = None
    num_steps_per_rollout: int = 1
    num_rollout: int | None = None
    num_epoch: int | None = None
    # Sampling.
    max_response_len: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    # Reward.
    rm_type: str = "math"
    custom_rm_path: str | None = None
    group_rm: bool = False
    reward_workers: int = 1
    # remote_rm: an HTTP reward server (docs/rewards.md has the wire contract).
    rm_url: str | None = None
    rm_timeout: float = 30.0
    rm_max_retries: int = 3
    rm_concurrency: int = 64
    # Producer.
    max_concurrency: int = 256
    # Asynchronous training: at most max_staleness policy versions between a trained token and the
    # learner (0: synchronous on-policy); what in-flight generations do when new weights arrive.
    max_staleness: int = 0
    on_weight_update: Literal["wait", "continue", "resume"] = "continue"
    # Dynamic sampling: prompts in flight per batch, and the filter finished groups must pass.
    over_sampling_batch_size: int | None = None
    dynamic_sampling_filter: Literal["none", "reward_std", "reward_std_fallback"] = "none"
    dynamic_sampling_filter_path: str | None = None
    # Partial rollout: groups aborted when their batch is full are kept and resumed first next time.
    partial_rollout: bool = False
    mask_offpolicy_in_partial_rollout: bool = False
    buffer_filter_path: str | None = None
    # Producer (or buffer) actor failures survived: each restarts the producer from the last version
    # boundary (docs/reliability.md); 0 ends the run at the first.
    max_producer_restarts: int = 3

    def check(self) -> None:
        self.non_negative("max_producer_restarts")
        self.positive("batch_size", "n_samples_per_prompt", "global_batch_size", "num_steps_per_rollout")
        self.positive("num_rollout", "num_epoch", "max_response_len", "reward_workers", "max_concurrency")
        self.non_negative("max_staleness")
        self._check_reward()
        if self.over_sampling_batch_size is not None:
            self.require(
                self.over_sampling_batch_size >= self.batch_size,
                "over_sampling_batch_size",
                f"{self.over_sampling_batch_size} is below batch_size={self.batch_size}",
            )
        self.require(
            not (self.dynamic_sampling_filter_path and self.dynamic_sampling_filter != "none"),
            "dynamic_sampling_filter_path",
            f"is set together with dynamic_sampling_filter={self.dynamic_sampling_filter!r}; choose one",
        )
        self.require(
            not (
                self.partial_rollout
                and self.max_staleness == 0
                and not self.mask_offpolicy_in_partial_rollout
            ),
            "partial_rollout",
            "resumed partial responses keep tokens of an older policy, which max_staleness = 0 forbids: "
            "set mask_offpolicy_in_partial_rollout = true, or max_staleness >= 1",
        )
        self.require(
            self.buffer_filter_path is None or self.partial_rollout,
            "buffer_filter_path",
            "selects cached partial rollouts, but partial_rollout is off",
        )
        self.non_negative("temperature")
        self.require(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        self.require(
            self.top_k == -1 or self.top_k > 0, "top_k", f"must be -1 (off) or > 0, got {self.top_k}"
        )
        self.require(
            self.num_rollout is not None or self.num_epoch is not None,
            "num_rollout",
            "set num_rollout (rollout steps) or num_epoch (passes over prompt_data)",
        )

    def _check_reward(self) -> None:
        problem = name_problem(self.rm_type)
        self.require(problem is None, "rm_type", problem or "")
        self.require(
            self.rm_type != REMOTE or bool(self.rm_url),
            "rm_url",
            "rm_type = 'remote_rm' needs rm_url, the reward server's http(s):// URL",
        )
        self.require(
            self.rm_url is None or bool(re.fullmatch(r"https?://[^/\s]+\S*", self.rm_url)),
            "rm_url",
            f"must be an http:// or https:// URL with a host, got {self.rm_url!r}",
        )
        self.require(
            not self.group_rm or bool(self.custom_rm_path),
            "group_rm",
            "scores a group with a custom function: set custom_rm_path",
        )
        self.positive("rm_timeout", "rm_concurrency")
        self.non_negative("rm_max_retries")

    @property
    def derived_global_batch_size(self) -> int:
        if self.global_batch_size is not None:
            return self.global_batch_size
        return self.batch_size * self.n_samples_per_prompt // self.num_steps_per_rollout


class EvalConfig(Section, kw_only=True):
    """[eval]: held-out evaluation (slime's EVAL_ARGS group). Unset sampling keys inherit from [rollout]."""

    section_name = "eval"

    interval: int | None = None
    datasets: dict[str, str] = msgspec.field(default_factory=dict)
    n_samples_per_eval_prompt: int = 1
    max_response_len: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    input_key: str | None = None
    label_key: str | None = None
    metadata_key: str | None = None
    apply_chat_template: bool | None = None

    def check(self) -> None:
        self.positive("n_samples_per_eval_prompt", "max_response_len")
        self.non_negative("interval")
        self.non_negative("temperature")
        if self.top_p is not None:
            self.require(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None:
            self.require(
                self.top_k == -1 or self.top_k > 0, "top_k", f"must be -1 (off) or > 0, got {self.top_k}"
            )
        if self.interval:
            self.require(
                bool(self.datasets), "datasets", "eval.interval is set but no eval.datasets are given"
            )
        for name in self.datasets:
            self.require(name.isidentifier(), "datasets", f"dataset name {name!r} must be an identifier")


class InferenceConfig(Section, kw_only=True):
    """[inference]: the inference engines (slime's SGLANG_ARGS group; the embedded engine by default)."""

    section_name = "inference"

    backend: Literal["embedded", "sglang"] = "embedded"
    num_engines: int = 1
    max_batch_size: int = 256
    batch_wait_ms: float = 2.0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Learner and engines share the devices (weights move in place, phases alternate): synchronous only.
    colocate: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # The weight push travels in buckets of at most this many bytes (a larger tensor travels alone).
    update_weight_buffer_size: int = 512 * 2**20
    # How the push travels to embedded engines: "auto" (CUDA IPC on a shared GPU, NCCL broadcast between
    # GPUs, else Ray's object store), or one of them ("broadcast" on CPUs uses gloo).
    weight_transfer: Literal["auto", "object_store", "cuda_ipc", "broadcast"] = "auto"
    # backend = "sglang" (docs/sglang.md): GPUs for rollout and per server (its tp_size), or servers
    # started elsewhere (engine_urls, optionally behind router_url); [inference.sglang] is forwarded.
    num_gpus: int | None = None
    num_gpus_per_engine: int = 1
    engine_urls: list[str] = msgspec.field(default_factory=list)
    router_url: str | None = None
    server_start_timeout: float = 900.0
    health_check_interval: float = 10.0
    health_check_timeout: float = 30.0
    max_server_restarts: int = 3
    # The program and module that start a server instead of `<python> -m sglang.launch_server` (the same
    # arguments follow), e.g. another environment's python with sglang installed.
    server_launcher: list[str] = msgspec.field(default_factory=list)
    sglang: dict[str, Any] = msgspec.field(default_factory=dict)
    # The embedded engine's implementation and device (docs/config.md): "static" is the static-cache
    # engine (engine/rollout/static_engine.py); "auto" picks it on CUDA for dense models.
    engine_impl: Literal["auto", "transformers", "static"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Static engine: positions per sequence (prompt + response) in its KV cache, padded tokens per
    # prefill chunk, decode steps replayed from CUDA graphs.
    context_length: int = 4096
    max_prefill_tokens: int = 16384
    cuda_graph: bool = True

    # An engine process that dies is restarted (by Ray) up to this many times, given the current weights
    # and its requests again; one with requests in flight and no progress for stall_timeout_s is killed
    # and restarted the same way.
    max_restarts: int = 3
    stall_timeout_s: float = 300.0

    def check(self) -> None:
        from engine.rollout.sglang.config import check_sglang

        self.positive("num_engines", "max_batch_size", "update_weight_buffer_size", "stall_timeout_s")
        self.non_negative("batch_wait_ms", "max_server_restarts", "max_restarts")
        self.positive("num_gpus", "num_gpus_per_engine", "server_start_timeout")
        self.positive("health_check_interval", "health_check_timeout")
        check_sglang(self)
        self.positive("context_length", "max_prefill_tokens")
