"""The buffer actor: a ZeroMQ PULL socket feeding the group assembler, and global batches on request.

A receiver thread decodes every frame; invalid frames are counted by reason and logged, never passed
on, and never stop the receiver. `get_batch` blocks until enough whole groups are in and returns them,
in arrival order, with the batch's rollout statistics.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from engine.buffer.groups import GroupAssembler
from engine.errors import WireError
from engine.transport import ZmqSampleSource
from engine.wire import Sample

log = logging.getLogger(__name__)


def batch_digest(samples: list[Sample]) -> str:
    """A fingerprint of what a batch trains on: groups, tokens and rewards, in order (not log-probs,
    whose last bits depend on the machine). Two runs that produce the same batches print the same."""
    h = hashlib.sha256()
    for x in samples:
        h.update(struct.pack("<qqd", x.group_id, x.index, x.reward))
        h.update(x.prompt_ids)
        h.update(x.response_ids)
        h.update(x.loss_mask)
    return h.hexdigest()[:16]


def rollout_stats(samples: list[Sample]) -> dict[str, Any]:
    """Reward, accuracy (share of positive rewards), length and status statistics of a batch."""
    rewards = np.array([x.reward for x in samples], dtype=np.float64)
    lengths = np.array([x.response_len for x in samples], dtype=np.float64)
    statuses = Counter(x.status for x in samples)
    n = max(len(samples), 1)
    return {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std()),
        "rollout/reward_min": float(rewards.min()),
        "rollout/reward_max": float(rewards.max()),
        "rollout/accuracy": float((rewards > 0).mean()),
        "rollout/response_len_mean": float(lengths.mean()),
        "rollout/response_len_max": float(lengths.max()),
        "rollout/truncated_frac": statuses["truncated"] / n,
        "rollout/aborted_frac": statuses["aborted"] / n,
        "rollout/samples": float(len(samples)),
        "rollout/batch_digest": batch_digest(samples),
    }


class BufferActor:
    """Ray actor (threaded: create with max_concurrency >= 2 so stats answer while get_batch waits)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._source = ZmqSampleSource(host)
        self._groups = GroupAssembler()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.invalid: Counter[str] = Counter()
        self.received = 0
        self.batches = 0
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._receive, name="buffer-recv", daemon=True)
        self._thread.start()

    def address(self) -> str:
        return self._source.address

    def _receive(self) -> None:
        try:
            self._receive_loop()
        except BaseException as e:  # handed to every get_batch caller, never lost
            with self._cond:
                self._failure = e
                self._cond.notify_all()
            raise

    def _receive_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sample = self._source.recv(timeout_ms=100)
            except WireError as e:
                self.invalid["undecodable"] += 1
                log.warning("buffer: rejected a frame: %s", e)
                continue
            if sample is None:
                continue
            with self._cond:
                self.received += 1
                reason = self._groups.add(sample)
                if reason is not None:
                    log.warning("buffer: rejected sample %d/%d: %s", sample.group_id, sample.index, reason)
                self._cond.notify_all()

    def get_batch(
        self, num_groups: int, timeout_s: float | None = None
    ) -> tuple[list[Sample], dict[str, Any]]:
        """The next num_groups whole groups to arrive (flattened, by group id) and their statistics."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._groups.ready_groups < num_groups:
                if self._failure is not None:
                    raise RuntimeError(f"buffer: the receiver failed: {self._failure!r}") from self._failure
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"buffer: {self._groups.ready_groups}/{num_groups} groups after {timeout_s}s"
                    )
                self._cond.wait(timeout=remaining)
            groups = self._groups.pop(num_groups)
            self.batches += 1
        # Which groups form a batch follows arrival; their order inside it does not depend on timing.
        samples = [x for g in sorted(groups, key=lambda g: g[0].group_id) for x in g]
        return samples, rollout_stats(samples)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "received": self.received,
                "accepted": self._groups.accepted,
                "ready_groups": self._groups.ready_groups,
                "partial_groups": self._groups.partial_groups,
                "rejected": dict(self._groups.rejected),
                "invalid_frames": dict(self.invalid),
                "batches": self.batches,
            }

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._source.close()
