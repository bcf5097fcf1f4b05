"""Weights as SGLang's /update_weights_from_tensor wants them: one serialized list per tp rank.

Guarantee: `serialize_named_tensors` produces SGLang 0.5.9's `serialized_named_tensors` payload
(base64 of a ForkingPickler dump of [(name, tensor), ...], the same list for every tp rank): tensors
travel as shared-memory or CUDA IPC handles, so the caller must keep them alive until the server has
answered.
"""

from __future__ import annotations

import base64
import io
from multiprocessing.reduction import ForkingPickler

import torch

from engine.errors import EngineError


def _patch_cuda_reductions() -> None:
    """CUDA tensors cross processes the way SGLang's receiving side expects (its own reduction patch)."""
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError as e:
        raise EngineError(
            "sending CUDA tensors to SGLang needs sglang importable in this process "
            "(its torch reduction patch): pip install sglang==0.5.9"
        ) from e
    monkey_patch_torch_reductions()


def serialize(obj: object) -> str:
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def deserialize(data: str) -> object:
    import pickle

    return pickle.loads(base64.b64decode(data, validate=True))


def serialize_named_tensors(named: dict[str, torch.Tensor], tp_size: int) -> list[str]:
    """CUDA tensors travel as CUDA IPC handles; CPU tensors as named shared-memory files (torch's
    file_system strategy, which a process that was not forked from this one can open)."""
    import torch.multiprocessing as tmp

    if any(t.is_cuda for t in named.values()):
        _patch_cuda_reductions()
    strategy = tmp.get_sharing_strategy()
    tmp.set_sharing_strategy("file_system")
    try:
        payload = serialize([(name, t.detach().contiguous()) for name, t in named.items()])
    finally:
        tmp.set_sharing_strategy(strategy)
    return [payload] * tp_size
