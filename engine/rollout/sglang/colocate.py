"""Colocated placement: SGLang servers on the GPUs of the learner ranks.

Guarantee: on a cluster with GPUs, `ColocatedPlacement.create` reserves one placement group of
cluster.learner_ranks bundles of one GPU each, packed on one node (the learner's rendezvous is on
loopback); learner rank i takes SHARE of bundle i's GPU and server j (of tp GPUs) SHARE of the GPU of
bundle j * tp, and a server with tp > 1 is shown the GPUs of learner ranks j * tp .. j * tp + tp - 1
(CUDA_VISIBLE_DEVICES by GPU UUID, which the learner ranks report). So every server runs on exactly the
GPUs of tp learner ranks, and inference.num_gpus plays no part. On a cluster without GPUs nothing is
reserved and every actor runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

SHARE = 0.5  # of one GPU, for a learner rank and for the server on it


@dataclass(frozen=True)
class ColocatedPlacement:
    group: PlacementGroup | None  # None: no GPUs, CPU run

    @classmethod
    def create(cls, learner_ranks: int) -> ColocatedPlacement:
        if not ray.cluster_resources().get("GPU", 0):
            return cls(None)
        group = placement_group([{"GPU": 1}] * learner_ranks, strategy="STRICT_PACK")
        ray.get(group.ready())
        return cls(group)

    def _bundle(self, index: int) -> dict[str, Any]:
        strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index)
        return {"num_gpus": SHARE, "scheduling_strategy": strategy}

    def learner_options(self, ranks: int) -> list[dict[str, Any]] | None:
        """Ray options per learner rank (None on the CPU: the learner's own defaults)."""
        return None if self.group is None else [self._bundle(i) for i in range(ranks)]

    def server_options(self, index: int, tp: int) -> dict[str, Any]:
        return {"num_gpus": 0} if self.group is None else self._bundle(index * tp)

    @staticmethod
    def visible_devices(index: int, tp: int, learner_gpus: list[str | None]) -> list[str] | None:
        """The GPUs server `index` must see: those of its tp learner ranks (None: Ray's choice, which
        is that one GPU when tp = 1, or the CPU)."""
        if tp == 1:
            return None
        uuids = learner_gpus[index * tp : (index + 1) * tp]
        return None if any(u is None for u in uuids) else [str(u) for u in uuids]
