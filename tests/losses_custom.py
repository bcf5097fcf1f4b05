"""Custom policy losses loaded by import path in the tests (algo.custom_loss_function_path)."""

from __future__ import annotations

import torch


def reinforce(*, logp: torch.Tensor, advantages: torch.Tensor, **_: object) -> torch.Tensor:
    """Vanilla policy gradient: -A logp per token."""
    return -advantages * logp


def wrong_shape(*, logp: torch.Tensor, **_: object) -> torch.Tensor:
    return logp.sum(-1)
