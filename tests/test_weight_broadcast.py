"""The broadcast weight push (engine/weight_broadcast.py) between a real learner rank and two embedded
engines, over gloo on the CPU (NCCL on GPUs is the same code): every engine ends with the learner's
exported weights at the pushed version; an engine that Ray restarts gets the held weights of the last
push without the group, and the next push forms a new group that includes it; and a short run with
inference.weight_transfer = "broadcast" trains end to end."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
import torch

from engine.cluster import actor_options
from engine.learner.config import OptimizerConfig
from engine.learner.group import LearnerGroup
from engine.rollout.config import InferenceConfig
from engine.rollout.engines import EmbeddedEngineActor
from engine.weight_broadcast import BroadcastPush
from tests.helpers import learner_spec
from tests.test_learner import rollout


def held_by_every_engine(engines, exported: dict[str, torch.Tensor]) -> None:
    for engine in engines:
        held = ray.get(engine.state_dict.remote())
        assert held.keys() == exported.keys()
        for name, t in exported.items():
            assert torch.equal(held[name], t), name


def test_broadcast_push_reaches_every_engine_and_a_restarted_one(ray_local, tiny_ckpt) -> None:
    learner = LearnerGroup(1, learner_spec(tiny_ckpt, optimizer=OptimizerConfig(lr=1e-2)))
    actor = ray.remote(EmbeddedEngineActor).options(**actor_options(max_restarts=1))
    engines = [actor.remote(str(tiny_ckpt), InferenceConfig(), i, 1, {}) for i in range(2)]
    try:
        ray.get([e.ready.remote() for e in engines])
        samples = rollout(tiny_ckpt, groups=2, n=4)
        push = BroadcastPush(learner, engines, 4096, "gloo")
        assert len(push.layout) > 1  # several buckets of at most 4 KiB
        learner.train(samples, 1)
        applied, held = push.push(1, "wait")
        assert ray.get(applied) == [1, 1] and held.version == 1
        held_by_every_engine(engines, ray.get(learner.export_weights()))

        first_group = push.name
        pid = ray.get(engines[0].pid.remote())
        os.kill(pid, signal.SIGKILL)  # Ray restarts it with the checkpoint's weights
        while True:
            try:
                if ray.get(engines[0].pid.remote()) != pid:
                    break
            except ray.exceptions.RayActorError:
                time.sleep(0.2)
        assert ray.get(engines[0].update_weights.remote([held], 1, "wait")) == 1  # as the producer does
        held_by_every_engine(engines, ray.get(learner.export_weights()))

        learner.train(samples, 1)
        applied, _ = push.push(2, "continue")
        assert ray.get(applied) == [2, 2] and push.name != first_group  # a new group with the new engine
        held_by_every_engine(engines, ray.get(learner.export_weights()))
        with pytest.raises(ray.exceptions.RayTaskError, match="holds the weights of version 2, not 1"):
            ray.get(held.fetch())
    finally:
        learner.shutdown()
        for e in engines:
            ray.kill(e)


@pytest.mark.slow
def test_a_run_with_broadcast_weight_transfer(tmp_path) -> None:
    from tests.test_launch import SMALL, launch, records

    proc = launch(tmp_path, *SMALL, "rollout.num_rollout=2", "inference.weight_transfer=broadcast")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = records(tmp_path)
    assert [r["version"] for r in rows[1:]] == [1, 2]
    assert all(r["rollout/samples"] == 16 for r in rows[1:])
