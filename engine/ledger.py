"""ledger.json: the end-of-run account of every group and sample (docs/async.md, docs/reliability.md).

Guarantee: the file is written only once the buffer has received every sample the producer reports as
sent (or reports frames it rejected), so producer and buffer counts describe the same messages.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray

from engine.config import Config


def write_ledger(
    path: Path, buffer: Any, cfg: Config, batches: int, restarts: dict[str, int], producer: dict[str, Any]
) -> None:
    """The producer's counts next to the buffer's, the restarts, and what was trained (batches steps)."""
    sent = producer["samples_sent"] + producer["partial_samples_sent"]
    counts = ray.get(buffer.stats.remote())
    while counts["received"] < sent and not counts["invalid_frames"]:  # the last messages in flight
        time.sleep(0.05)
        counts = ray.get(buffer.stats.remote())
    r = cfg.rollout
    ledger = {
        "producer": producer,
        "buffer": counts,
        "restarts": restarts,
        "trained": {"batches": batches, "samples": batches * r.batch_size * r.n_samples_per_prompt},
    }
    path.write_text(json.dumps(ledger, indent=2))
