"""The learner on CUDA (run on the GPU host: pytest -m gpu): Megatron's DistributedDataParallel and
distributed optimizer in place of torch's optimizer, the same training step as the CPU learner, bf16
training, exact resume of the optimizer's sharded state, and the compiled / packed fast path.

Every test compares a CUDA learner with a reference that could disagree: the CPU learner on the same
samples, or the same CUDA learner without the option under test.
"""

from __future__ import annotations

import msgspec
import pytest
import ray
import torch

from engine.learner.checkpoint import rank_file
from engine.learner.config import ModelConfig, OptimizerConfig, PerfConfig
from engine.learner.group import LearnerGroup
from tests.helpers import learner_spec
from tests.test_learner import rollout

pytestmark = pytest.mark.gpu

KEYS = ("loss", "pg_loss", "grad_norm", "entropy", "ppo_kl", "lr")


def group(ckpt, *, gpu: bool = True, dtype: str = "float32", perf=None, resume=None) -> LearnerGroup:
    spec = learner_spec(
        ckpt,
        perf=perf or PerfConfig(micro_batch_size=4),
        optimizer=OptimizerConfig(lr=1e-3, lr_decay_style="cosine", lr_warmup_iters=1, min_lr=1e-4),
        resume_from=None if resume is None else str(resume),
    )
    spec = msgspec.structs.replace(spec, model=ModelConfig(params_dtype=dtype))
    return LearnerGroup(1, spec, gpu_share=1.0 if gpu else 0.0)


def run(g: LearnerGroup, samples, steps: int) -> tuple[list[dict], dict[str, torch.Tensor]]:
    try:
        metrics = [g.train(samples, 1)[0] for _ in range(steps)]
        return metrics, ray.get(g.export_weights())
    finally:
        g.shutdown()


def close(a: float, b: float, rel: float, floor: float = 1e-6) -> bool:
    """Equal within rel of the larger of the two, plus floor for values that are zero up to rounding
    (GRPO's first-step loss is the mean advantage)."""
    return abs(a - b) <= rel * max(abs(a), abs(b)) + floor


def test_fp32_cuda_steps_equal_the_cpu_learner(ray_local, tiny_ckpt) -> None:
    samples = rollout(tiny_ckpt, groups=4, n=4)
    cuda = group(tiny_ckpt)
    assert cuda.info[0]["device"].startswith("cuda") and cuda.info[0]["optimizer"] == "MegatronModelOptimizer"
    cpu = group(tiny_ckpt, gpu=False)
    assert cpu.info[0]["device"] == "cpu" and cpu.info[0]["optimizer"] == "TorchModelOptimizer"
    (m_gpu, w_gpu), (m_cpu, w_cpu) = run(cuda, samples, 3), run(cpu, samples, 3)
    for a, b in zip(m_gpu, m_cpu, strict=True):
        for key in KEYS:
            assert close(a[key], b[key], 1e-3), (key, a[key], b[key])
    assert w_gpu.keys() == w_cpu.keys()
    for name, t in w_gpu.items():
        assert t.device.type == "cpu" and t.dtype == torch.float32
        torch.testing.assert_close(t, w_cpu[name], rtol=1e-4, atol=1e-5, msg=name)


def tensors_of(obj, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nest of dicts and lists, by its path."""
    if isinstance(obj, torch.Tensor):
        return {path: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else []
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(tensors_of(value, f"{path}/{key}"))
    return out


def test_bf16_learner_tracks_fp32_and_resumes_its_sharded_optimizer_exactly(
    ray_local, tiny_ckpt, tmp_path
) -> None:
    samples = rollout(tiny_ckpt, groups=4, n=4)
    first = group(tiny_ckpt, dtype="bfloat16")
    assert first.info[0]["dtype"] == "torch.bfloat16"  # norms included: every parameter in bf16
    try:
        warm = [first.train(samples, 1)[0] for _ in range(2)]
        first.save_state(str(tmp_path / "it"))
        saved = ray.get(first.export_weights())
        straight = first.train(samples, 1)[0]
        after = ray.get(first.export_weights())
    finally:
        first.shutdown()
    m_fp32, _ = run(group(tiny_ckpt), samples, 2)
    for a, b in zip(warm, m_fp32, strict=True):  # bf16 weights, fp32 master weights and gradients
        for key in ("loss", "grad_norm", "entropy"):
            assert close(a[key], b[key], 3e-2), (key, a[key], b[key])
    resumed_group = group(tiny_ckpt, dtype="bfloat16", resume=tmp_path / "it")
    resumed_group.save_state(str(tmp_path / "back"))  # what the resumed learner holds, before any step
    (resumed,), weights = run(resumed_group, samples, 1)
    # The optimizer's shard (fp32 master weights, Adam moments) and the model came back bit for bit.
    before = torch.load(rank_file(tmp_path / "it", 0), weights_only=True)["optimizer"]
    back = torch.load(rank_file(tmp_path / "back", 0), weights_only=True)["optimizer"]
    want, got = tensors_of(before), tensors_of(back)
    assert want.keys() == got.keys() and len(want) > 4
    for key, t in want.items():
        assert torch.equal(t, got[key]), key
    for key in KEYS:
        assert close(resumed[key], straight[key], 1e-3), (key, resumed[key], straight[key])
    # The step after resume lands where the straight run's did, up to what two straight runs differ by
    # (bf16 kernels are not bitwise reproducible: a weight near a rounding boundary flips a whole ulp).
    _, again_weights = run(group(tiny_ckpt, dtype="bfloat16"), samples, 3)
    moved = sum(float((after[k].float() - saved[k].float()).abs().sum()) for k in after)
    repeat = sum(float((again_weights[k].float() - after[k].float()).abs().sum()) for k in after)
    off = sum(float((weights[k].float() - after[k].float()).abs().sum()) for k in after)
    assert moved > 0 and off <= max(2 * repeat, 0.01 * moved), (off, repeat, moved)


def test_compiled_layers_and_packed_batches_give_the_eager_padded_step(ray_local, tiny_ckpt) -> None:
    samples = rollout(tiny_ckpt, groups=4, n=4)
    fast = PerfConfig(use_dynamic_batch_size=True, max_tokens_per_gpu=96, torch_compile=True)
    m_fast, w_fast = run(group(tiny_ckpt, perf=fast), samples, 2)
    m_eager, w_eager = run(group(tiny_ckpt), samples, 2)
    for a, b in zip(m_fast, m_eager, strict=True):
        for key in KEYS:
            assert close(a[key], b[key], 1e-3), (key, a[key], b[key])
    for name, t in w_fast.items():
        torch.testing.assert_close(t, w_eager[name], rtol=1e-4, atol=1e-5, msg=name)


def test_colocated_offload_between_steps_changes_no_number(ray_local, tiny_ckpt) -> None:
    """Colocated mode's sleep (master weights and Adam moments to page-locked host buffers, gradient
    buffers freed) and wake between steps give the same steps as a learner that never sleeps (up to
    kernel nondeterminism: far below what a lost or stale moment would move); while asleep the GPU holds
    less (the tiny model's state is small, but it is all gone)."""
    samples = rollout(tiny_ckpt, groups=4, n=4)
    g = group(tiny_ckpt, dtype="bfloat16")
    try:
        start = ray.get(g.export_weights())
        metrics, freed = [], []
        for _ in range(3):
            awake = g.memory()[0]["allocated_gib"]
            g.sleep()
            freed.append(awake - g.memory()[0]["allocated_gib"])
            g.wake()
            metrics.append(g.train(samples, 1)[0])
        weights = ray.get(g.export_weights())
    finally:
        g.shutdown()
    plain, plain_weights = run(group(tiny_ckpt, dtype="bfloat16"), samples, 3)
    for a, b in zip(metrics, plain, strict=True):
        for key in KEYS:
            assert close(a[key], b[key], 1e-3), (key, a[key], b[key])
    moved = max(float((plain_weights[k].float() - start[k].float()).abs().max()) for k in start)
    off = max(float((weights[k].float() - plain_weights[k].float()).abs().max()) for k in start)
    assert moved > 0 and off <= 0.05 * moved, (off, moved)
    assert freed[0] > 0 and freed[2] > freed[0], freed  # after a step the moments go too
