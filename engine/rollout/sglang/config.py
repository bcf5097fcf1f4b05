"""Checks of the SGLang keys of [inference] and of the [inference.sglang] pass-through table.

Guarantee: a config that passes `check_sglang` describes engines that can be built: the GPU counts
divide into whole engines, external addresses are http(s) URLs, and every forwarded server argument
is a value the command line can carry and not one the launcher sets itself. Each error names the key.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.rollout.config import InferenceConfig

# Server arguments the launcher sets from other keys; naming them in [inference.sglang] is an error.
RESERVED = {
    "model_path": "ckpt.hf_checkpoint (or the run's current weights)",
    "tokenizer_path": "ckpt.hf_checkpoint",
    "host": "the node the server actor runs on",
    "port": "a free port chosen by the server actor",
    "tp_size": "inference.num_gpus_per_engine",
    "tensor_parallel_size": "inference.num_gpus_per_engine",
    "base_gpu_id": "the GPUs Ray assigns to the server actor",
    "nccl_port": "a free port chosen by the server actor",
    "weight_version": "the policy version the server starts at",
}
URL = re.compile(r"https?://[^/\s:]+(:\d+)?/?")


def _fail(key: str, message: str) -> None:
    raise ConfigError(message, section="inference", key=key)


def check_server_args(args: dict[str, Any]) -> None:
    """Every [inference.sglang] entry is a forwardable value (str, int, float, bool, or a list of them)."""
    for name, value in args.items():
        key = f"sglang.{name}"
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            _fail(key, "SGLang server arguments are written in snake_case (forwarded as --kebab-case)")
        if name in RESERVED:
            _fail(key, f"is set by the launcher from {RESERVED[name]}; remove it from [inference.sglang]")
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            _fail(key, "an empty list cannot be forwarded; remove the key")
        for item in items:
            if isinstance(item, (dict, list)) or item is None:
                _fail(key, f"must be a string, number, boolean or a list of them, got {value!r}")
            if isinstance(item, bool) and isinstance(value, list):
                _fail(key, f"a list of booleans cannot be forwarded, got {value!r}")


def check_sglang(cfg: InferenceConfig, *, learner_ranks: int | None = None) -> None:
    """The SGLang keys of [inference] (called from InferenceConfig.check for every backend)."""
    check_server_args(cfg.sglang)
    for i, url in enumerate(cfg.engine_urls):
        if not URL.fullmatch(url):
            _fail(f"engine_urls[{i}]", f"must be an http(s)://host:port URL, got {url!r}")
    if cfg.router_url is not None and not URL.fullmatch(cfg.router_url):
        _fail("router_url", f"must be an http(s)://host:port URL, got {cfg.router_url!r}")
    if len(set(cfg.engine_urls)) != len(cfg.engine_urls):
        _fail("engine_urls", "lists the same server twice")
    for i, word in enumerate(cfg.server_launcher):
        if not word.strip():
            _fail(f"server_launcher[{i}]", "is empty; give the program and its arguments as words")
    if cfg.backend != "sglang":
        for key in ("engine_urls", "router_url", "num_gpus", "server_launcher"):
            if getattr(cfg, key):
                _fail(key, f"is an SGLang key, but backend = {cfg.backend!r}; set backend = 'sglang'")
        if cfg.sglang:
            _fail("sglang", f"[inference.sglang] is forwarded to SGLang, but backend = {cfg.backend!r}")
        return
    if cfg.router_url and not cfg.engine_urls:
        _fail(
            "router_url",
            "a router balances servers started elsewhere: list them in engine_urls (the weight push "
            "goes to each server, generation goes through the router)",
        )
    if cfg.engine_urls:
        if cfg.server_launcher:
            _fail("server_launcher", "starts servers, but engine_urls names servers started elsewhere")
        if cfg.num_gpus:
            _fail("num_gpus", "is for servers this run starts; engine_urls names servers started elsewhere")
        if cfg.colocate:
            _fail("colocate", "colocated servers share the learner's GPUs, so they cannot be engine_urls")
        return
    if cfg.colocate:
        if cfg.sglang.get("enable_memory_saver") is False:
            _fail(
                "sglang.enable_memory_saver",
                "colocated servers release their memory while the learner trains, which needs SGLang's "
                "memory saver: leave it out (it is turned on when colocate = true) or set it true",
            )
        if learner_ranks is not None and learner_ranks % cfg.num_gpus_per_engine:
            _fail(
                "num_gpus_per_engine",
                f"colocated engines span the learner's {learner_ranks} GPUs (cluster.learner_ranks), "
                f"which {cfg.num_gpus_per_engine} does not divide",
            )
        return
    if not cfg.num_gpus:
        _fail("num_gpus", "backend = 'sglang' needs num_gpus (GPUs for rollout) or engine_urls")
    if cfg.num_gpus % cfg.num_gpus_per_engine:
        _fail(
            "num_gpus",
            f"{cfg.num_gpus} GPUs do not divide into engines of num_gpus_per_engine="
            f"{cfg.num_gpus_per_engine}",
        )


# What colocated servers get unless [inference.sglang] says otherwise: the memory saver that
# /release_memory_occupation needs, and a static memory share (weights + KV cache) that leaves the other
# half of the GPU to the learner's weights (its optimizer state is on the host during rollout).
COLOCATED_DEFAULTS: dict[str, Any] = {"enable_memory_saver": True, "mem_fraction_static": 0.5}


def server_args(cfg: InferenceConfig) -> dict[str, Any]:
    """The forwarded server arguments: [inference.sglang], with the colocated defaults first."""
    if cfg.colocate:
        return {**COLOCATED_DEFAULTS, **cfg.sglang}
    return dict(cfg.sglang)


def engine_count(cfg: InferenceConfig, learner_ranks: int) -> int:
    """How many SGLang servers the run uses."""
    if cfg.engine_urls:
        return len(cfg.engine_urls)
    gpus = learner_ranks if cfg.colocate else (cfg.num_gpus or 0)
    return gpus // cfg.num_gpus_per_engine
