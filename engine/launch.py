"""`python -m engine.launch config.toml [section.key=value ...]`: check everything, then train.

Order of work, so bad input costs seconds: parse and check the config; resolve built-in task paths
(building the task on first use); load and check every data file and the reward; decide where the
weights come from (a checkpoint to resume, checked against the config; engine/checkpoint.py); only
then start Ray and the actors. The run directory is printed first; metrics.jsonl, the resolved config
and checkpoints go there. Exit status: 0 done, 1 failed during the run, 2 bad config or data, 130
interrupted. Ray and every actor are shut down on each of these paths.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import msgspec

from engine.checkpoint import Start
from engine.cluster import ray_session
from engine.config import Config, load_config
from engine.errors import ConfigError, DataError
from engine.quiet import quiet_upstream_notices
from engine.tasks import resolve_path

log = logging.getLogger("engine")


def resolve_builtin_paths(config: Config) -> Config:
    """Replace `builtin:` paths by real ones (building the built-in task if it is not cached yet)."""
    ckpt = msgspec.structs.replace(
        config.ckpt,
        hf_checkpoint=resolve_path(config.ckpt.hf_checkpoint),
        ref_load=config.ckpt.ref_load and resolve_path(config.ckpt.ref_load),
        load=config.ckpt.load and resolve_path(config.ckpt.load),
    )
    rollout = msgspec.structs.replace(config.rollout, prompt_data=resolve_path(config.rollout.prompt_data))
    datasets = {}
    for name, path in config.eval.datasets.items():
        try:
            datasets[name] = resolve_path(path)
        except ConfigError as e:
            raise ConfigError(e.message, section="eval", key=f"datasets.{name}") from None
    evaluation = msgspec.structs.replace(config.eval, datasets=datasets)
    return msgspec.structs.replace(config, ckpt=ckpt, rollout=rollout, eval=evaluation)


def check_eval_datasets(config: Config) -> None:
    """Every eval.datasets.<name> is an existing file (an error names the dataset before any loading)."""
    for name, path in config.eval.datasets.items():
        if not Path(path).is_file():
            what = "is not a file" if Path(path).exists() else "does not exist"
            raise ConfigError(f"{path!r} {what}", section="eval", key=f"datasets.{name}")


def prepare(config_path: str, overrides: list[str]) -> tuple[Config, list, dict, int, Start]:
    """Everything that can fail on bad input, before any actor exists."""
    import torch
    from transformers import AutoTokenizer

    from engine.checkpoint import plan_start
    from engine.hf_config import load_hf_config
    from engine.learner.hf_bridge import layers_per_stage, shape_of
    from engine.learner.hf_moe import check_trainable
    from engine.learner.worker import check_device
    from engine.preflight import preflight
    from engine.rollout.data import load_datasets
    from engine.rollout.rewards import resolve_reward

    config = load_config(config_path, overrides)
    config = resolve_builtin_paths(config)
    check_eval_datasets(config)
    check_device(config.model.params_dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    hf_config = load_hf_config(config.ckpt.hf_checkpoint, config.model.overrides)
    tp = config.perf.tensor_model_parallel_size
    shape = shape_of(hf_config, tp=tp, ep=config.perf.expert_model_parallel_size)
    check_trainable(shape.moe, tp=tp)
    layers_per_stage(shape, config.perf.pipeline_model_parallel_size)
    resolve_reward(config.rollout.rm_type, config.rollout.custom_rm_path)
    preflight(config)  # import paths, rm_url and the sample stream's keys, checked and logged
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.ckpt.hf_checkpoint)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer: {e}", section="ckpt", key="hf_checkpoint") from None
    prompts, eval_sets = load_datasets(config.rollout, config.eval, tokenizer)
    r = config.rollout
    num_rollout = (
        r.num_rollout if r.num_rollout is not None else (r.num_epoch or 1) * len(prompts) // r.batch_size
    )
    if num_rollout < 1:
        raise ConfigError(
            f"num_epoch={r.num_epoch} over {len(prompts)} prompts gives no full batch of {r.batch_size}",
            section="rollout",
            key="num_epoch",
        )
    config.optimizer.check_schedule(num_rollout * r.num_steps_per_rollout)
    start = plan_start(config, hf_config, len(prompts), num_rollout)
    return config, prompts, eval_sets, num_rollout, start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.launch", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="TOML config file")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--no-progress", action="store_true", help="log one line per step instead of a bar")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    quiet_upstream_notices()

    try:
        config, prompts, eval_sets, num_rollout, start = prepare(args.config, args.overrides)
    except (ConfigError, DataError) as e:
        print(e, file=sys.stderr)
        return 2

    from engine.controller import Trainer
    from engine.metrics import MetricsLogger

    run_name = config.run_name or f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(config.output_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_bytes(msgspec.json.format(msgspec.json.encode(config), indent=2))
    print(f"run directory: {run_dir}", file=sys.stderr, flush=True)
    log.info(
        "%d prompts, %d rollout steps of %d prompts x %d samples",
        len(prompts),
        num_rollout,
        config.rollout.batch_size,
        config.rollout.n_samples_per_prompt,
    )

    progress = False if args.no_progress else None
    logger = MetricsLogger(run_dir, num_rollout, tensorboard=config.tensorboard, progress=progress)
    started = time.monotonic()
    try:
        with ray_session(config.cluster):
            trainer = Trainer(config, prompts, eval_sets, num_rollout, logger, start)
            try:
                trainer.build()
                trainer.run()
                trainer.close()
            finally:
                trainer.kill()
    except KeyboardInterrupt:
        print(f"interrupted; metrics so far are in {logger.path}", file=sys.stderr)
        return 130
    except Exception:
        log.exception("run failed; metrics so far are in %s", logger.path)
        return 1
    finally:
        logger.close()
    print(f"done in {time.monotonic() - started:.0f}s; metrics: {logger.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
