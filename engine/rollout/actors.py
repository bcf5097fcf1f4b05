"""Starting a run's rollout actors: the inference engines (embedded engines or SGLang servers) with the
clients the producer sends its requests to, the buffer, and the producer.

Guarantees: `start_embedded` returns inference.num_engines engine actors, each restarted by Ray up to
inference.max_restarts times and asking for `share` of a GPU (engine/gpu_plan.gpu_share); they may still
be loading their model (their `ready` returns once they have). `start_sglang` returns only once every
server answers /health (engine/rollout/sglang/launch.py): on GPUs of their own, or, given the colocated
placement and the learner ranks' GPUs, on those GPUs (engine/rollout/sglang/colocate.py). Either way the
producer's clients are the engine actors themselves, or one SGLang endpoint per server (one for the
router when inference.router_url is set). Ray never restarts the producer or the buffer (the
controller replaces them: engine/supervisor.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray

from engine.buffer.buffer import BufferActor
from engine.cluster import actor_options, gpus_per_actor
from engine.config import Config
from engine.rollout.engines import EmbeddedEngineActor
from engine.rollout.producer_actor import ProducerActor


@dataclass(frozen=True)
class RolloutActors:
    """The inference side of a run: engine actors (embedded) or server actors (SGLang), never both."""

    engines: list[Any]  # EmbeddedEngineActor handles
    servers: list[Any]  # SglangServerActor handles
    clients: list[Any]  # what the producer builds its engine clients from

    @property
    def actors(self) -> list[Any]:
        return [*self.engines, *self.servers]


def start_embedded(cfg: Config, model_path: str, share: float) -> RolloutActors:
    """inference.num_engines embedded engine actors loading `model_path` (engine i seeded with i, and
    pinned to core i with cluster.pin_cores)."""
    options = actor_options(num_gpus=gpus_per_actor(share), max_restarts=cfg.inference.max_restarts)
    engine_actor = ray.remote(EmbeddedEngineActor).options(**options)
    threads = cfg.cluster.threads()
    engines = [
        engine_actor.remote(
            model_path,
            cfg.inference,
            i,
            threads,
            cfg.model.overrides,
            i if cfg.cluster.pin_cores else None,
        )
        for i in range(cfg.inference.num_engines)
    ]
    return RolloutActors(engines, [], engines)


def start_sglang(
    cfg: Config, model_path: str, colocated: tuple[Any, list[str | None]] | None = None
) -> RolloutActors:
    """SGLang server actors serving `model_path`, healthy; `colocated`: the ColocatedPlacement and the
    learner ranks' GPU UUIDs to put them on."""
    from engine.rollout.sglang import launch as sglang

    if colocated is None:
        servers = sglang.start_servers(cfg.inference, model_path, cfg.cluster.learner_ranks)
    else:
        placement, learner_gpus = colocated
        servers = sglang.start_colocated_servers(cfg.inference, model_path, placement, learner_gpus)
    return RolloutActors([], servers, sglang.endpoints(cfg.inference, servers))


def start_buffer(cfg: Config) -> Any:
    """The buffer actor (engine/buffer/buffer.py), cutting batches of rollout.batch_size groups."""
    options = actor_options(max_concurrency=8)
    return (
        ray.remote(BufferActor)
        .options(**options)
        .remote(cfg.rollout.batch_size, cfg.rollout.buffer_filter_path, cfg.transport)
    )


def start_producer(
    cfg: Config,
    prompts: tuple[Any, Any],
    clients: list[Any],
    buffer: tuple[Any, str],
    num_batches: int,
    resume: bytes | None,
    *,
    incarnation: int,
    weights: tuple[int, list[Any] | None],
) -> Any:
    """The producer actor (engine/rollout/producer_actor.py): `prompts` the ObjectRefs of the training
    prompts and the eval sets, `buffer` the buffer actor and its ZeroMQ address, `resume` the rollout
    state to start from (None: the start of the stream), `weights` the version the engines hold and the
    last push's weights."""
    return (
        ray.remote(ProducerActor)
        .options(**actor_options(max_concurrency=4))
        .remote(
            cfg.rollout,
            cfg.eval,
            cfg.ckpt.hf_checkpoint,
            *prompts,
            clients,
            *buffer,
            num_batches,
            resume,
            transport=cfg.transport,
            inference=cfg.inference,
            incarnation=incarnation,
            weights=weights,
        )
    )
