"""The GPU weight push: how HF-named tensors are laid into shared buckets (CPU), and an engine on the same
GPU receiving a learner's weights by CUDA IPC (GPU host: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

from engine.cuda_ipc import ALIGN, bucket_bytes, pack, plan, unpack


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 5), "b": (7,), "c": (64, 64), "d": (1,), "e": (300, 2)}
    bf16, f32 = torch.bfloat16, torch.float32
    dtypes = {"a": bf16, "b": f32, "c": bf16, "d": torch.int64, "e": torch.float16}
    return {n: torch.randn(s, generator=g).to(dtypes[n]) for n, s in shapes.items()}


@pytest.mark.parametrize("max_bytes", [1, 600, 4096, 2**20])
def test_every_tensor_once_in_order_aligned_and_within_the_bucket_size(max_bytes: int) -> None:
    named = tensors()
    buckets = plan(named, max_bytes)
    entries = [e for b in buckets for e in b]
    assert [e.name for e in entries] == list(named)  # each once, in order
    for bucket in buckets:
        assert bucket[0].offset == 0
        end = 0
        for e in bucket:
            t = named[e.name]
            assert e.offset % ALIGN == 0 and e.offset >= end  # aligned, no overlap
            assert e.nbytes == t.numel() * t.element_size() and e.shape == tuple(t.shape)
            assert getattr(torch, e.dtype) == t.dtype
            end = e.offset + e.nbytes
        assert end <= max_bytes or len(bucket) == 1  # only a tensor larger than the size travels alone
    if max_bytes >= 2**20:
        assert len(buckets) == 1


def test_a_bucket_round_trips_through_its_layout() -> None:
    """What SharedBuckets.share (and a broadcast) writes and SharedBucket.open reads (CPU tensors)."""
    named = tensors()
    for entries in plan(named, 4096):
        flat = pack(named, entries)
        assert flat.dtype == torch.uint8 and flat.numel() == bucket_bytes(entries)
        back = unpack(flat, entries)
        assert list(back) == [e.name for e in entries]
        for name, t in back.items():
            assert t.dtype == named[name].dtype and torch.equal(t, named[name])


@pytest.mark.gpu
def test_an_engine_on_the_learners_gpu_receives_its_weights_by_cuda_ipc(ray_local, tiny_ckpt) -> None:
    import msgspec
    import ray

    from engine.cluster import actor_options, gpus_per_actor
    from engine.cuda_ipc import SharedBucket
    from engine.learner.config import ModelConfig, OptimizerConfig
    from engine.learner.group import LearnerGroup
    from engine.rollout.config import InferenceConfig
    from engine.rollout.engines import EmbeddedEngineActor
    from tests.helpers import learner_spec
    from tests.test_learner import rollout

    spec = learner_spec(tiny_ckpt, optimizer=OptimizerConfig(lr=1e-3))
    spec = msgspec.structs.replace(spec, model=ModelConfig(params_dtype="bfloat16"))
    learner = LearnerGroup(1, spec, gpu_share=0.5)
    engine = (
        ray.remote(EmbeddedEngineActor)
        .options(**actor_options(num_gpus=gpus_per_actor(0.5)))
        .remote(str(tiny_ckpt), InferenceConfig(dtype="bfloat16"), 0, 1, {})
    )
    try:
        assert ray.get(engine.gpu_uuid.remote()) == learner.info[0]["gpu_uuid"] is not None
        learner.train(rollout(tiny_ckpt, groups=2, n=4), 1)  # weights that differ from the checkpoint
        buckets = ray.get(learner.export_shared_buckets(4096))
        assert len(buckets) > 1 and all(isinstance(b, SharedBucket) for b in buckets)
        assert ray.get(engine.update_weights.remote(learner.export_shared_buckets(4096), 7, "wait")) == 7
        exported, held = ray.get(learner.export_weights()), ray.get(engine.state_dict.remote())
        for name, t in exported.items():
            assert torch.equal(held[name], t), name
    finally:
        learner.shutdown()
        ray.kill(engine)
