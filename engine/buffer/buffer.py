"""The buffer actor: a ZeroMQ PULL socket feeding the group assembler, and global batches on request.

A receiver thread decodes every frame; invalid messages are counted by reason and logged (the first
ones, then a summary at most every 10 s), never passed on, and never stop the receiver. While the
samples it holds exceed [transport] max_buffered_bytes the receiver stops reading (ZeroMQ's high-water
marks then hold the producer back), unless a caller waits for samples that have not arrived: memory
stays bounded and no accepted sample is dropped. Each group goes to the batch the producer assigned it
(or to the partial-rollout cache); `get_batch(b)` blocks until batch b is full and returns it with its
rollout and staleness statistics and its groups' prompt indices and ids (in group order). Partial groups
of a checkpoint come back through `restore_partials`, ahead of any cached in this run. `rewind` takes
the buffer back to a version boundary for a restarted producer (on a fresh socket, so nothing the dead
producer still had in flight can arrive).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from engine.buffer.groups import BatchBuffer
from engine.errors import WireError
from engine.ratelog import RateLimitedLog
from engine.transport import TransportConfig, ZmqSampleSource
from engine.wire import Sample

RECV_POLL_MS = 100

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
    by_group: dict[int, list[float]] = {}
    for x in samples:
        by_group.setdefault(x.group_id, []).append(x.reward)
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
        "rollout/zero_std_groups": float(sum(1 for r in by_group.values() if np.std(r) == 0)),
        "rollout/batch_digest": batch_digest(samples),
    }


def staleness_stats(samples: list[Sample], version: int) -> dict[str, Any]:
    """Per sample: version - the oldest version among its trained (loss-mask 1) tokens; a histogram."""
    values = []
    for x in samples:
        trained = x.version_array[x.mask_array.astype(bool)]
        if len(trained):
            values.append(version - int(trained.min()))
    if not values:
        return {"staleness/mean": 0.0, "staleness/max": 0}
    hist = Counter(values)
    out: dict[str, Any] = {"staleness/mean": float(np.mean(values)), "staleness/max": max(values)}
    out.update({f"staleness/hist_{s}": hist[s] for s in sorted(hist)})
    return out


class BufferActor:
    """Ray actor (threaded: create with max_concurrency >= 3 so calls answer while get_batch waits)."""

    def __init__(
        self,
        batch_size: int,
        buffer_filter_path: str | None = None,
        transport: TransportConfig | None = None,
    ) -> None:
        from engine.rollout.rewards import load_object

        self._select = load_object(buffer_filter_path) if buffer_filter_path else None
        self._transport = transport or TransportConfig()
        self._buffer = BatchBuffer(batch_size)
        self._cond = threading.Condition()
        self._rejections = RateLimitedLog(log, "buffer: rejected a message")
        self.received = 0
        self.batches = 0
        self.pauses = 0  # times the receiver stopped reading at max_buffered_bytes
        self.max_held_bytes = 0
        self.discarded = 0  # samples forgotten by rewinds (their groups are generated again)
        self._waiters = 0  # callers waiting for samples not arrived yet
        self._failure: BaseException | None = None
        self._start_receiver()

    def _start_receiver(self) -> None:
        self._source = ZmqSampleSource(self._transport)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="buffer-recv", daemon=True)
        self._thread.start()

    def _stop_receiver(self) -> None:
        self._stop.set()
        self._thread.join()
        self._source.close()

    @property
    def invalid(self) -> Counter[str]:
        """Invalid messages by reason."""
        return self._rejections.counts

    def address(self) -> str:
        return self._source.address

    def pid(self) -> int:
        return os.getpid()

    def _receive(self) -> None:
        try:
            self._receive_loop()
        except BaseException as e:  # handed to every waiting caller, never lost
            with self._cond:
                self._failure = e
                self._cond.notify_all()
            raise

    def _full(self) -> bool:
        """Hold off reading: over max_buffered_bytes and nobody waits for samples still to come."""
        return self._buffer.held_bytes > self._transport.max_buffered_bytes and not self._waiters

    def _receive_loop(self) -> None:
        stop, source = self._stop, self._source
        while not stop.is_set():
            with self._cond:
                if self._full():
                    self.pauses += 1
                    while self._full() and not stop.is_set():
                        self._cond.wait(timeout=RECV_POLL_MS / 1000)
            try:
                samples = source.recv(timeout_ms=RECV_POLL_MS)
            except WireError as e:
                self._rejections.event(e.reason, str(e))
                continue
            if samples is None:
                self._rejections.flush()
                continue
            with self._cond:
                for sample in samples:
                    self.received += 1
                    reason = self._buffer.add(sample)
                    if reason is not None:
                        log.warning(
                            "buffer: rejected sample %d/%d: %s", sample.group_id, sample.index, reason
                        )
                self.max_held_bytes = max(self.max_held_bytes, self._buffer.held_bytes)
                self._cond.notify_all()

    def _wait(self, ready: Any, timeout_s: float | None, what: str) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not ready():
            if self._failure is not None:
                raise RuntimeError(f"buffer: the receiver failed: {self._failure!r}") from self._failure
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"buffer: {what} not ready after {timeout_s}s")
            self._waiters += 1
            try:
                self._cond.notify_all()  # a receiver held off by max_buffered_bytes reads again
                self._cond.wait(timeout=remaining)
            finally:
                self._waiters -= 1

    def get_batch(self, batch: int, timeout_s: float | None = None) -> tuple[list[Sample], dict[str, Any]]:
        """Batch `batch` (trained at policy version `batch`) once full, with its statistics."""
        with self._cond:
            self._wait(lambda: self._buffer.ready(batch), timeout_s, f"batch {batch}")
            samples = self._buffer.pop(batch)
            self.batches += 1
            self._cond.notify_all()
        firsts = [x for x in samples if x.index == 0]
        return samples, {
            **rollout_stats(samples),
            **staleness_stats(samples, batch),
            "prompt_indices": [x.prompt_index for x in firsts],
            "group_ids": [x.group_id for x in firsts],
        }

    def restore_partials(self, groups: list[list[Sample]]) -> None:
        """Put a checkpoint's cached partial groups back (before the producer starts taking them)."""
        with self._cond:
            self._buffer.restore_partials(groups)
            self._cond.notify_all()

    def rewind(self, version: int, partials: list[list[Sample]]) -> dict[str, Any] | None:
        """Back to the boundary where the learner holds `version` (batches below it handed out), for a
        producer restarted from that boundary: everything not handed out is forgotten, `partials` become
        the cache, and the receiver moves to a fresh socket. Returns the new address, the highest group
        id seen and the count of forgotten samples; None (nothing changed) if batch `version` was
        already handed out, so the boundary has passed."""
        self._stop_receiver()  # nothing arrives while the state changes
        with self._cond:
            if version in self._buffer.handed_out:
                rewound = None
            else:
                forgotten = self._buffer.rewind(partials)
                self.discarded += forgotten
                rewound = {"max_group_id": self._buffer.max_group_id, "forgotten": forgotten}
                log.warning(
                    "buffer: rewound to version %d for a restarted producer: %d samples forgotten",
                    version,
                    forgotten,
                )
            self._cond.notify_all()
        self._start_receiver()
        if rewound is not None:
            rewound["address"] = self._source.address
        return rewound

    def take_partials(self, n: int, sent: int, timeout_s: float | None = None) -> list[list[Sample]]:
        """Up to n cached partial groups, once the first `sent` partial groups have all arrived."""
        with self._cond:
            self._wait(lambda: self._buffer.partials_received >= sent, timeout_s, f"{sent} partial groups")
            return self._buffer.take_partials(n, self._select)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            b = self._buffer
            return {
                "received": self.received,
                "accepted": b.assembler.accepted,
                "partial_groups": b.assembler.partial_groups,
                "cached_partials": len(b.partials),
                "rejected": dict(b.assembler.rejected + b.rejected),
                "invalid_frames": dict(self.invalid),
                "batches": self.batches,
                "held_bytes": b.held_bytes,
                "max_held_bytes": self.max_held_bytes,
                "receiver_pauses": self.pauses,
                "discarded_on_rewind": self.discarded,
            }

    def close(self) -> None:
        self._stop_receiver()
        self._rejections.flush()
