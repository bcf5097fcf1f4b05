"""Run metrics: one JSON object per step in metrics.jsonl, optional TensorBoard, and progress on screen.

Guarantee: each record is written and flushed as one line as soon as it is logged, so metrics.jsonl is
readable while the run is going and complete up to the last finished step after a crash or Ctrl-C.
On a terminal the progress is a bar with reward and accuracy (and each eval set's accuracy and pass@n);
elsewhere it is one log line per step.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger("engine.metrics")


def mean_of(records: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean over records (keys missing from some records average over those that have them)."""
    keys = {k for r in records for k in r}
    return {k: sum(r[k] for r in records if k in r) / sum(1 for r in records if k in r) for k in sorted(keys)}


def summary(metrics: dict[str, Any]) -> str:
    """The progress line: training reward and accuracy, then each eval set's accuracy and pass@n."""
    parts = []
    if "rollout/reward_mean" in metrics:
        parts.append(f"reward {metrics['rollout/reward_mean']:.3f} acc {metrics['rollout/accuracy']:.3f}")
    evals = []
    for key, value in metrics.items():
        if key.startswith("eval/") and key.endswith("/accuracy"):
            name = key.split("/")[1]
            n = max(
                (int(k.rsplit("@", 1)[1]) for k in metrics if k.startswith(f"eval/{name}/pass@")), default=1
            )
            at_n = f" pass@{n} {metrics[f'eval/{name}/pass@{n}']:.3f}" if n > 1 else ""
            evals.append(f"{name} {value:.3f}{at_n}")
    if evals:
        parts.append("eval acc " + ", ".join(evals))
    return " | ".join(parts)


class MetricsLogger:
    def __init__(
        self, run_dir: Path, total_steps: int, *, tensorboard: bool = False, progress: bool | None = None
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (open for the whole run)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self._bar: Progress | None = None
        if sys.stderr.isatty() if progress is None else progress:
            self._bar = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[summary]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task("train", total=total_steps, summary="")
            self._bar.start()
        self._last_eval = ""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, "wall_time": time.time(), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "wall_time") and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        line = summary(metrics)
        if "eval acc" in line:
            self._last_eval = line.split(" | ")[-1]
            if self._bar is not None:
                self._bar.console.log(f"step {step}: {self._last_eval}")
        if self._bar is not None:
            train = line.split(" | ")[0] if "reward" in line else ""
            self._bar.update(
                self._task, completed=step, summary=" | ".join(p for p in (train, self._last_eval) if p)
            )
        else:
            log.info("step %d/%d %s", step, self.total_steps, line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
