"""Activation recomputation ([perf] recompute_*) changes memory, never the step: the same loss, metrics
and updated weights as without it, for full (uniform and block) and selective recomputation."""

from __future__ import annotations

import pytest
import torch

from engine.errors import ConfigError
from engine.learner.config import PerfConfig
from engine.learner.group import LearnerGroup
from tests.helpers import learner_spec
from tests.test_learner import rollout


def train_once(ckpt, samples, perf: PerfConfig):
    import ray

    g = LearnerGroup(1, learner_spec(ckpt, perf=perf))
    try:
        (info,) = ray.get([w.ready.remote() for w in g.workers])
        assert info["recompute"] == perf.recompute_granularity  # the model really is built with it
        metrics = g.train(samples, 1)[0]
        weights = ray.get(g.export_weights())
    finally:
        g.shutdown()
    return metrics, weights


@pytest.fixture(scope="module")
def samples(tiny_ckpt):
    return rollout(tiny_ckpt, groups=2, n=4)


@pytest.fixture(scope="module")
def plain(ray_local, tiny_ckpt, samples):
    return train_once(tiny_ckpt, samples, PerfConfig(micro_batch_size=4))


@pytest.mark.parametrize(
    "recompute",
    [
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
        {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
        {"recompute_granularity": "selective"},
    ],
    ids=["full-uniform", "full-block", "selective"],
)
def test_recomputation_gives_the_same_step(ray_local, tiny_ckpt, samples, plain, recompute) -> None:
    metrics, weights = train_once(tiny_ckpt, samples, PerfConfig(micro_batch_size=4, **recompute))
    ref_metrics, ref_weights = plain
    for key in ("loss", "pg_loss", "grad_norm", "entropy"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-7), key
    for name, tensor in ref_weights.items():
        assert torch.allclose(weights[name], tensor, atol=1e-6), name


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"recompute_granularity": "full", "recompute_num_layers": 1}, "recompute_method"),
        ({"recompute_granularity": "full", "recompute_method": "block"}, "recompute_num_layers"),
        ({"recompute_method": "uniform"}, "recompute_method"),
        ({"recompute_granularity": "selective", "recompute_num_layers": 2}, "recompute_num_layers"),
        (
            {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 0},
            "recompute_num_layers",
        ),
    ],
)
def test_recompute_options_are_checked(fields: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        PerfConfig(**fields).check()
    assert (err.value.section, err.value.key) == ("perf", key)
