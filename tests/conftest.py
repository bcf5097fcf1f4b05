from __future__ import annotations

import os

import pytest

from tests.helpers import make_checkpoint


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: on a machine without it they are reported as skipped, by name."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU host: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random tiny Qwen2 checkpoint (tied embeddings) with the character tokenizer."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen2")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session (actors request no CPUs, as on a 2-core machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
