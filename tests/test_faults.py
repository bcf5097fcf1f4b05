"""Faults injected into a real run (Ray actors, ZeroMQ, Megatron learner on CPU), by process id:

an engine process killed with requests in flight, then stopped (SIGSTOP: a stuck engine, found by
inference.stall_timeout_s), then the producer process killed, then the buffer process. The run
finishes; the prompt ledger shows every trained prompt exactly once and every batch full, the restarts
are counted in the metrics, and
the ledger accounts for every group the last producer started and every sample the buffer forgot.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from engine.controller import Trainer
from engine.launch import prepare
from engine.metrics import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]
STEPS, GROUPS, N = 40, 4, 4  # a step takes a fraction of a second; a restart many seconds


class Run:
    """A Trainer in a thread of the test process, so the test can reach its actors."""

    def __init__(self, tmp_path: Path, *overrides: str) -> None:
        args = [
            f"output_dir={tmp_path}",
            "run_name=run",
            f"rollout.batch_size={GROUPS}",
            f"rollout.n_samples_per_prompt={N}",
            f"rollout.num_rollout={STEPS}",
            "perf.micro_batch_size=16",
            "optimizer.lr_warmup_iters=0",
            "eval.datasets={}",
            "eval.interval=0",
            "cluster.torch_threads=1",
            *overrides,
        ]
        quickstart = str(ROOT / "configs" / "quickstart.toml")
        config, prompts, eval_sets, num_rollout, start = prepare(quickstart, args)
        self.dir = tmp_path / "run"
        self.dir.mkdir(parents=True)
        self.logger = MetricsLogger(self.dir, num_rollout, progress=False)
        self.trainer = Trainer(config, prompts, eval_sets, num_rollout, self.logger, start)
        self.trainer.build()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.trainer.run()
            self.trainer.close()
        except BaseException as e:  # handed to the test thread
            self.error = e

    def steps(self) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def wait_step(self, step: int) -> dict:
        while len(self.steps()) < step:
            assert self.thread.is_alive(), f"run ended early: {self.error!r}"
            time.sleep(0.2)
        return self.steps()[step - 1]

    def engine_busy(self) -> int:
        """The engine's pid, once it has requests in flight."""
        import ray

        engine = self.trainer.engines[0]
        while ray.get(engine.stats.remote())["in_flight"] == 0:
            assert self.thread.is_alive(), f"run ended early: {self.error!r}"
            time.sleep(0.01)
        return ray.get(engine.pid.remote())

    def kill_engine_mid_call(self) -> int:
        """SIGKILL engine 0 while the producer waits on a generate call to it (so the call fails and the
        restart is the guard's to handle): the engine is stopped first and killed only if a call of the
        producer's is still waiting on it a second later, else resumed and tried again."""
        import ray

        while True:
            pid = self.engine_busy()
            os.kill(pid, signal.SIGSTOP)
            time.sleep(1.0)  # an answer sent before the stop reaches the producer meanwhile
            if ray.get(self.trainer.producer.engine_calls_in_flight.remote())[0] > 0:
                os.kill(pid, signal.SIGKILL)
                return pid
            os.kill(pid, signal.SIGCONT)

    def finish(self) -> None:
        self.thread.join()
        try:
            if self.error is not None:
                raise self.error
        finally:
            self.trainer.kill()
            self.logger.close()


@pytest.mark.slow
def test_killed_and_stuck_engine_killed_producer_and_buffer_lose_nothing(tmp_path: Path, ray_local) -> None:
    run = Run(tmp_path, "rollout.max_staleness=1", "inference.stall_timeout_s=4", "inference.max_restarts=3")
    try:
        run.wait_step(1)
        killed = run.kill_engine_mid_call()  # an engine dies with requests in flight
        while run.steps()[-1].get("producer/engine_restarts", 0) < 1:
            run.wait_step(len(run.steps()) + 1)
        assert len(run.steps()) < STEPS, "the run ended before the next fault"
        assert run.steps()[-1].get("producer/engine_stalls", 0) == 0  # a restart is not a stall
        stuck = run.engine_busy()
        assert stuck != killed
        os.kill(stuck, signal.SIGSTOP)  # an engine hangs: only the stall timeout can find it
        while run.steps()[-1].get("producer/engine_stalls", 0) < 1:
            run.wait_step(len(run.steps()) + 1)
        at = len(run.steps())
        assert at < STEPS, "the run ended before the producer could be killed"
        producer = ray_local.get(run.trainer.producer.pid.remote())
        os.kill(producer, signal.SIGKILL)
        while run.steps()[-1].get("restarts/producer", 0) < 1:
            run.wait_step(len(run.steps()) + 1)
        assert len(run.steps()) < STEPS, "the run ended before the buffer could be killed"
        buffer = ray_local.get(run.trainer.buffer.pid.remote())
        os.kill(buffer, signal.SIGKILL)  # the buffer dies with samples in it: its producer goes too
    finally:
        run.finish()

    rows = run.steps()
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["rollout/samples"] == GROUPS * N for r in rows)
    stalled = next(r for r in rows if r.get("producer/engine_stalls"))
    assert stalled["producer/engine_restarts"] == 2 and stalled["producer/engine_requests_resubmitted"] >= 1
    assert rows[-1]["restarts/producer"] == 1 and rows[-1]["restarts/buffer"] == 1
    lines = (run.dir / "prompt_ledger.jsonl").read_text().splitlines()
    prompts = [p for line in lines for p in json.loads(line)["prompt_index"]]
    assert len(prompts) == STEPS * GROUPS and len(set(prompts)) == len(prompts)  # each trained exactly once
    ledger = json.loads((run.dir / "ledger.json").read_text())
    p, b = ledger["producer"], ledger["buffer"]
    assert ledger["restarts"] == {"producer": 1, "buffer": 1}
    ended = p["groups_assigned"] + sum(p["groups_filtered"].values()) + p["surplus_cached"]
    ended += p["surplus_dropped"] + p["surplus_finished_dropped"]
    assert p["groups_started"] == ended, p  # the restarted producer's every group accounted for
    assert not b["rejected"] and not b["invalid_frames"]
    # every sample the last buffer received was trained, forgotten at a restart (and generated again),
    # or is still in the buffer (a batch not trained because the run was over); that buffer started when
    # the first one was killed, so it has seen the batches trained from then on
    after = sum(1 for r in rows if r["restarts/buffer"] == 1)
    assert 0 < after < STEPS
    assert b["received"] >= after * GROUPS * N + b["discarded_on_rewind"]
    print(
        f"faults: engine kill + stall + producer and buffer kills; {len(prompts)} prompts trained once; "
        f"{b['discarded_on_rewind']} samples regenerated after the producer restart"
    )
