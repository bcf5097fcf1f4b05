"""The CPU-checkable part of engine/learner/megatron_optim.py: restored Adam state keeps one step counter
per parameter (Megatron 0.16 restores one shared counter, which torch's multi-tensor Adam would advance
once per parameter). The rest of the module needs CUDA (tests/test_learner_gpu.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.learner.megatron_optim import own_step_tensors


def adam(params: list[torch.Tensor]) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=1e-2, foreach=True)


def restored_as_megatron_does(opt: torch.optim.Adam) -> torch.optim.Adam:
    """A copy of opt whose per-parameter step counters are one shared tensor (Megatron's load path)."""
    copy_ = copy.deepcopy(opt)
    shared = torch.tensor(float(next(iter(copy_.state.values()))["step"]))
    for param_state in copy_.state.values():
        param_state["step"] = shared
    return copy_


@pytest.mark.parametrize("fixed", [False, True])
def test_each_parameter_gets_its_own_step_counter_after_a_restore(fixed: bool) -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    opt = adam(params)
    for _ in range(2):
        opt.zero_grad()
        sum((p**2).sum() for p in params).backward()
        opt.step()
    restored = restored_as_megatron_does(opt)
    if fixed:
        own_step_tensors(restored)
    for o in (opt, restored):
        o.zero_grad()
        ps = o.param_groups[0]["params"]
        sum((p**2).sum() for p in ps).backward()
        o.step()
    steps = [float(s["step"]) for s in restored.state.values()]
    same = all(
        torch.equal(a, b)
        for a, b in zip(opt.param_groups[0]["params"], restored.param_groups[0]["params"], strict=True)
    )
    if fixed:
        assert steps == [3.0, 3.0, 3.0] and same
    else:  # the hazard the fix removes: the shared counter advanced once per parameter
        assert steps == [5.0, 5.0, 5.0] and not same
