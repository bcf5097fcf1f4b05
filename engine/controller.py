"""The training controller: builds the actors and runs rollout -> train -> weight push, step by step.

                    +-------------------- weights (versioned, HF-named) ---------------------+
                    v                                                                        |
 prompts --> [Producer: asyncio/uvloop] --requests--> [Inference engines]                    |
 (JSONL)       |  groups, rewards,          <--tokens+logprobs--  (embedded, Ray actors)      |
               |  admission control                                                          |
               +--ZMQ PUSH (msgspec)--> [Buffer] --global batches--> [Learner: Megatron ranks] -+
                                        groups                         logprob recompute,
                                                                       loss, optimizer step

Control calls are Ray actor calls; samples travel over ZeroMQ; batches go from the buffer to the
learner ranks as Ray object references (the controller never holds them); weights go from learner rank 0
to the engines the same way. Guarantees: the engines hold version v exactly when the producer is told
v; every step's batch comes whole from the buffer; a failure in any actor ends the run with that error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray

from engine.buffer.buffer import BufferActor
from engine.cluster import actor_options
from engine.config import Config
from engine.learner.config import LearnerSpec
from engine.learner.group import LearnerGroup
from engine.metrics import MetricsLogger, mean_of
from engine.rollout.data import Prompt
from engine.rollout.engines import EmbeddedEngineActor
from engine.rollout.producer_actor import ProducerActor


class Trainer:
    def __init__(
        self,
        config: Config,
        prompts: list[Prompt],
        eval_sets: dict[str, list[Prompt]],
        num_rollout: int,
        logger: MetricsLogger,
    ) -> None:
        self.cfg, self.num_rollout, self.logger = config, num_rollout, logger
        self.prompts, self.eval_sets = prompts, eval_sets
        self.version = 0
        self._pushed: Any = []  # the last push's completion (an ObjectRef once a push happened)
        self._actors: list[Any] = []

    def build(self) -> None:
        c = self.cfg
        threads = c.cluster.threads()
        self.buffer = (
            ray.remote(BufferActor)
            .options(**actor_options(max_concurrency=8))
            .remote(c.rollout.batch_size, c.rollout.buffer_filter_path)
        )
        self._actors.append(self.buffer)
        address = ray.get(self.buffer.address.remote())
        engine_actor = ray.remote(EmbeddedEngineActor)
        self.engines = [
            engine_actor.options(**actor_options()).remote(
                c.ckpt.load or c.ckpt.hf_checkpoint,
                c.inference,
                i,
                threads,
                c.model.overrides,
                i if c.cluster.pin_cores else None,
            )
            for i in range(c.inference.num_engines)
        ]
        self._actors += self.engines
        self.producer = (
            ray.remote(ProducerActor)
            .options(**actor_options(max_concurrency=4))
            .remote(
                c.rollout,
                c.eval,
                c.ckpt.hf_checkpoint,
                ray.put(self.prompts),
                ray.put(self.eval_sets),
                self.engines,
                self.buffer,
                address,
                self.num_rollout,
            )
        )
        self._actors.append(self.producer)
        spec = LearnerSpec(
            model=c.model,
            ckpt=c.ckpt,
            perf=c.perf,
            algo=c.algo,
            optimizer=c.optimizer,
            temperature=c.rollout.temperature,
            total_steps=self.num_rollout * c.rollout.num_steps_per_rollout,
            seed=c.seed,
            threads=threads,
            first_core=c.inference.num_engines if c.cluster.pin_cores else None,
        )
        self.learner = LearnerGroup(c.cluster.learner_ranks, spec)
        self._actors += self.learner.workers
        ray.get([e.ready.remote() for e in self.engines])
        ray.get(self.producer.num_prompts.remote())
        self.prompts, self.eval_sets = [], {}  # the producer holds them now

    def _wait_batch(self, ref: Any, producer_run: Any, step: int) -> Any:
        """ray.get(ref) for step's batch, failing instead of waiting forever when it cannot come.

        If the producer fails first, its error is raised. Once it has finished, every batch has been
        assigned and every sample sent; if the buffer has then received them all and the batch is still
        not there (a sample was rejected), it can never come, and that is an error naming the counts.
        """
        ready, _ = ray.wait([ref, producer_run], num_returns=1)
        if ref in ready:
            return ray.get(ref)
        counts = ray.get(producer_run)  # raises the producer's error
        sent = counts.get("samples_sent", 0) + counts.get("partial_samples_sent", 0)
        while not ray.wait([ref], timeout=1.0)[0]:
            stats = ray.get(self.buffer.stats.remote())
            if stats["batches"] < step and stats["received"] >= sent:
                raise RuntimeError(
                    f"step {step}: the producer sent all {sent} samples and the buffer received them, "
                    f"but batch {step - 1} is incomplete (rejected: {stats['rejected']}, "
                    f"incomplete groups: {stats['partial_groups']})"
                )
        return ray.get(ref)

    def eval_due(self, step: int) -> bool:
        """Evaluate at step 0, every eval.interval steps and at the last step (when there are eval sets)."""
        interval = self.cfg.eval.interval
        if not self.cfg.eval.datasets:
            return False
        return step in (0, self.num_rollout) or bool(interval and step % interval == 0)

    def evaluate(self) -> dict[str, float]:
        names = list(self.cfg.eval.datasets)
        results = ray.get([self.producer.evaluate.remote(name) for name in names])
        return {k: v for r in results for k, v in r.items()}

    def run(self) -> None:
        c = self.cfg
        producer_run = self.producer.run.remote()
        if self.eval_due(0):
            self.logger.log(0, self.evaluate())
        for step in range(1, self.num_rollout + 1):
            t0 = time.perf_counter()
            samples_ref, stats_ref = self.buffer.get_batch.options(num_returns=2).remote(step - 1)
            metrics = dict(self._wait_batch(stats_ref, producer_run, step))
            t1 = time.perf_counter()
            train_steps = self.learner.train(samples_ref, c.rollout.num_steps_per_rollout)
            t2 = time.perf_counter()
            self.push_weights(step)
            t3 = time.perf_counter()
            producer_stats = self.producer.stats.remote()
            engine_stats = [e.stats.remote() for e in self.engines]
            metrics.update({f"train/{k}": v for k, v in mean_of(train_steps).items()})
            metrics.update(
                {
                    "time/rollout_wait": t1 - t0,
                    "time/train": t2 - t1,
                    "time/weight_sync": t3 - t2,
                    "version": self.version,
                }
            )
            if self.eval_due(step):
                ray.get(self._pushed)
                metrics.update(self.evaluate())
            if c.ckpt.save and (
                (c.ckpt.save_interval and step % c.ckpt.save_interval == 0) or step == self.num_rollout
            ):
                metrics["ckpt/path"] = self.learner.save_hf(str(Path(c.ckpt.save) / f"step_{step}"))
            metrics.update(ray.get(producer_stats))
            metrics["engine/busy_s"] = sum(s["busy_s"] for s in ray.get(engine_stats))
            metrics["time/step"] = time.perf_counter() - t0
            self.logger.log(step, metrics)
        ray.get(self._pushed)
        self.write_ledger(ray.get(producer_run))

    def write_ledger(self, producer: dict[str, Any]) -> None:
        """ledger.json in the run directory: the producer's account of every group and sample, next to
        the buffer's own counts once it has received everything the producer sent."""
        sent = producer["samples_sent"] + producer["partial_samples_sent"]
        buffer = ray.get(self.buffer.stats.remote())
        while buffer["received"] < sent and not buffer["invalid_frames"]:  # the last messages in flight
            time.sleep(0.05)
            buffer = ray.get(self.buffer.stats.remote())
        c = self.cfg.rollout
        ledger = {
            "producer": producer,
            "buffer": buffer,
            "trained": {
                "batches": self.num_rollout,
                "samples": self.num_rollout * c.batch_size * c.n_samples_per_prompt,
            },
        }
        (self.logger.path.parent / "ledger.json").write_text(json.dumps(ledger, indent=2))

    def push_weights(self, version: int) -> None:
        """Learner rank 0 -> every engine (through the object store), then the producer learns the version.

        Only the export blocks: the engines load the weights while the learner goes on with the next
        batch. The producer's set_version takes the engines' acknowledgements as arguments, so Ray runs
        it only once every engine holds the new version (the producer never admits work for a version
        the engines do not have yet), and the next push first waits for this one to be complete.
        """
        weights = self.learner.export_weights()
        ray.get(self._pushed)
        mode = self.cfg.rollout.on_weight_update
        applied = [e.update_weights.remote(weights, version, mode) for e in self.engines]
        self._pushed = self.producer.set_version.remote(version, *applied)
        self.version = version

    def close(self) -> None:
        """Orderly end of a finished run: flush and close the producer and the buffer (errors propagate)."""
        ray.get([self.producer.close.remote(), self.buffer.close.remote()])

    def kill(self) -> None:
        """End every actor this trainer started, whatever state it is in."""
        for actor in self._actors:
            ray.kill(actor)
        self._actors.clear()
