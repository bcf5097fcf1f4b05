"""Logging for events that may come in floods (rejected messages): the first few are logged one by one,
then at most one summary line per interval, so a flood of garbage cannot flood the log or slow the
receiver. Nothing is lost from the counts: every event is counted by reason whether logged or not.
"""

from __future__ import annotations

import logging
import time
from collections import Counter


class RateLimitedLog:
    def __init__(self, log: logging.Logger, what: str, *, first: int = 10, interval_s: float = 10.0) -> None:
        self._log, self._what = log, what
        self._first, self._interval = first, interval_s
        self.counts: Counter[str] = Counter()
        self._unlogged: Counter[str] = Counter()
        self._last = 0.0

    def event(self, reason: str, detail: str) -> None:
        """Count one event; log it if it is among the first, else summarise at most once an interval."""
        self.counts[reason] += 1
        if self.counts.total() <= self._first:
            self._log.warning("%s (%s): %s", self._what, reason, detail)
            return
        self._unlogged[reason] += 1
        now = time.monotonic()
        if now - self._last >= self._interval:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Log the summary of events not logged yet (if any)."""
        if self._unlogged:
            self._log.warning(
                "%s: %d more (%s); %d in all so far",
                self._what,
                self._unlogged.total(),
                ", ".join(f"{k}: {v}" for k, v in sorted(self._unlogged.items())),
                self.counts.total(),
            )
            self._unlogged.clear()
        self._last = time.monotonic() if now is None else now
