"""Silence upstream notices that are expected on this project's machines and say nothing actionable.

Megatron-core warns at import time that Transformer Engine and Apex are absent (the CPU path uses its
local fallbacks on purpose) and about CUDA stream settings; torch warns about a deprecated collective
Megatron still calls. Each filter matches one message; anything else is still shown.
"""

from __future__ import annotations

import logging
import os
import warnings

MESSAGES = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
    r"When using async grad allreduce it is recommended to set the environment variable CUDA_DEVICE_MAX",
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
)


def quiet_upstream_notices() -> None:
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    for message in MESSAGES:
        warnings.filterwarnings("ignore", message=f".*{message}.*")
    logging.getLogger("megatron").setLevel(logging.WARNING)
