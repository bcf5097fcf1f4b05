"""Building the SGLang engines of a run: server actors on placement-group GPUs (or at external
addresses), the producer's endpoints, and the weight sync.

Guarantee: `start_servers` returns only when every server answers /health (servers this run starts
get inference.num_gpus_per_engine GPUs each from one placement group, inference.num_gpus in all, or
none on a cluster without GPUs; `start_colocated_servers` puts them on the learner ranks' GPUs,
engine/rollout/sglang/colocate.py); the endpoints it returns build one client per server, or one
client for the router when inference.router_url is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.rollout.config import InferenceConfig
from engine.rollout.sglang.colocate import ColocatedPlacement
from engine.rollout.sglang.config import engine_count, server_args
from engine.rollout.sglang.server import ServerSpec, SglangServerActor


@dataclass(frozen=True)
class SglangEndpoint:
    """What the producer needs to build a client: the URL, and the server actor that can recover it
    (None for a router: its servers are recovered through their own actors)."""

    url: str
    server: Any | None

    def client(self) -> Any:
        from engine.rollout.sglang.client import SglangEngineClient

        return SglangEngineClient(self.url, self.server, recover=self.server is not None)


def server_spec(
    cfg: InferenceConfig,
    model_path: str,
    external_url: str | None = None,
    visible_devices: list[str] | None = None,
) -> ServerSpec:
    return ServerSpec(
        model_path=model_path,
        tp_size=cfg.num_gpus_per_engine,
        args=server_args(cfg),
        start_timeout=cfg.server_start_timeout,
        health_interval=cfg.health_check_interval,
        health_timeout=cfg.health_check_timeout,
        max_restarts=cfg.max_server_restarts,
        launcher=list(cfg.server_launcher) or None,
        external_url=external_url,
        visible_devices=visible_devices,
    )


def start_servers(cfg: InferenceConfig, model_path: str, learner_ranks: int) -> list[Any]:
    """Server actors, started and healthy."""
    actor = ray.remote(SglangServerActor)
    if cfg.engine_urls:
        servers = [
            actor.options(num_cpus=0).remote(server_spec(cfg, model_path, url), i)
            for i, url in enumerate(cfg.engine_urls)
        ]
    elif not ray.cluster_resources().get("GPU", 0):  # a CPU run (inference.sglang.device = "cpu")
        n = engine_count(cfg, learner_ranks)
        servers = [actor.options(num_cpus=0).remote(server_spec(cfg, model_path), i) for i in range(n)]
    else:
        n, tp = engine_count(cfg, learner_ranks), cfg.num_gpus_per_engine
        group = placement_group([{"GPU": tp}] * n, strategy="PACK")
        ray.get(group.ready())
        servers = [
            actor.options(
                num_cpus=0,
                num_gpus=tp,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i),
            ).remote(server_spec(cfg, model_path), i)
            for i in range(n)
        ]
    ray.get([s.start.remote() for s in servers])
    return servers


def start_colocated_servers(
    cfg: InferenceConfig, model_path: str, placement: ColocatedPlacement, learner_gpus: list[str | None]
) -> list[Any]:
    """Server actors on the learner ranks' GPUs (`learner_gpus`: each rank's GPU UUID), started and
    healthy: learner_ranks / num_gpus_per_engine of them."""
    actor = ray.remote(SglangServerActor)
    tp = cfg.num_gpus_per_engine
    servers = []
    for i in range(len(learner_gpus) // tp):
        spec = server_spec(cfg, model_path, visible_devices=placement.visible_devices(i, tp, learner_gpus))
        servers.append(actor.options(num_cpus=0, **placement.server_options(i, tp)).remote(spec, i))
    ray.get([s.start.remote() for s in servers])
    return servers


def endpoints(cfg: InferenceConfig, servers: list[Any]) -> list[SglangEndpoint]:
    if cfg.router_url:
        return [SglangEndpoint(cfg.router_url, None)]
    return [SglangEndpoint(url, s) for url, s in zip(ray.get([s.url.remote() for s in servers]), servers)]
