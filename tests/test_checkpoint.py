"""Checkpoints: learner state round trips on 1 and 2 ranks, which checkpoint a run starts from, the
errors on a bad one, and the producer's account of every prompt at a checkpoint.

Learner ranks are real Ray actors on gloo; checkpoint directories are made on the spot.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from engine import checkpoint
from engine.buffer.buffer import BufferActor
from engine.config import load_config
from engine.errors import ConfigError
from engine.hf_config import load_hf_config
from engine.learner.config import (
    OptimizerConfig,
    PerfConfig,
)
from engine.learner.group import LearnerGroup
from engine.rollout.config import EvalConfig, RolloutConfig
from engine.rollout.data import Prompt
from engine.rollout.producer import TRAIN, Producer
from engine.rollout.progress import Group, Pending, Progress, RolloutState, decode_state, encode_state
from engine.rollout.rewards import RewardPool
from engine.rollout.sampling import derive_seed
from engine.rollout.scheduler import BatchScheduler
from engine.transport import ZmqSampleSink
from engine.wire import Sample
from tests.helpers import learner_spec, prompt_ids, sample
from tests.test_engine_modes import BufferPartials, Local, actor
from tests.test_learner import rollout

# --- the learner's state ------------------------------------------------------------------------------


def learner(
    ckpt: Path,
    ranks: int,
    tp: int,
    pp: int,
    resume: Path | None = None,
    init: Path | None = None,
    cp: int = 1,
) -> LearnerGroup:
    perf = PerfConfig(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        micro_batch_size=4,
    )
    spec = learner_spec(
        ckpt,
        perf=perf,
        optimizer=OptimizerConfig(lr=1e-3, lr_decay_style="cosine", lr_warmup_iters=1, min_lr=1e-4),
        resume_from=None if resume is None else str(resume),
        init_from=None if init is None else str(init),
    )
    return LearnerGroup(ranks, spec)


def rank_states(root: Path, ranks: int) -> list[dict]:
    return [torch.load(root / "ranks" / f"rank_{r:03d}.pt", weights_only=True) for r in range(ranks)]


def same(a, b) -> bool:
    """Nested state dicts equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize(
    "ranks, tp, pp, cp",
    [(1, 1, 1, 1), (2, 2, 1, 1), (2, 1, 2, 1), pytest.param(2, 1, 1, 2, marks=pytest.mark.slow)],
    ids=["one-rank", "tensor-parallel-2", "pipeline-2", "context-parallel-2"],
)
def test_learner_state_round_trip(ray_local, tiny_ckpt, tmp_path, ranks, tp, pp, cp) -> None:
    """Save after two optimizer steps, restore into fresh ranks: the same weights, optimizer moments,
    scheduler step and RNG states, and the next step is the same step; the weights alone load too."""
    import ray

    samples = rollout(tiny_ckpt, groups=2, n=4)
    first = learner(tiny_ckpt, ranks, tp, pp, cp=cp)
    try:
        first.train(samples, 2)
        first.save_state(str(tmp_path / "a"))
        weights = ray.get(first.export_weights())
        step = first.train(samples, 1)[0]
        after = ray.get(first.export_weights())
    finally:
        first.shutdown()
    assert (tmp_path / "a" / "model" / "metadata.json").is_file()  # Megatron's dist_checkpointing format
    second = learner(tiny_ckpt, ranks, tp, pp, resume=tmp_path / "a", cp=cp)
    try:
        assert all(torch.equal(t, weights[k]) for k, t in ray.get(second.export_weights()).items())
        second.save_state(str(tmp_path / "b"))
        resumed_step = second.train(samples, 1)[0]
        resumed_after = ray.get(second.export_weights())
    finally:
        second.shutdown()
    # The saved weights as initial weights (ckpt.ref_load naming a checkpoint): Megatron's format read back.
    (tmp_path / "a" / "meta.json").write_text("{}")
    (tmp_path / "a" / "complete").write_text("2\n")
    third = learner(tiny_ckpt, ranks, tp, pp, init=tmp_path / "a", cp=cp)
    try:
        assert all(torch.equal(t, weights[k]) for k, t in ray.get(third.export_weights()).items())
    finally:
        third.shutdown()
    saved, restored = rank_states(tmp_path / "a", ranks), rank_states(tmp_path / "b", ranks)
    for a, b in zip(saved, restored, strict=True):
        assert a["scheduler"]["num_steps"] == 2 and a["optimizer"]["state"]  # Adam moments were saved
        assert same(a["optimizer"], b["optimizer"]) and same(a["scheduler"], b["scheduler"])
        assert same(a["rng"], b["rng"])
    for key in ("lr", "grad_norm", "loss"):
        assert resumed_step[key] == step[key], key
    assert all(torch.equal(t, after[k]) for k, t in resumed_after.items())


# --- which checkpoint a run starts from ---------------------------------------------------------------


def config(tmp_path: Path, ckpt: Path, *overrides: str):
    path = tmp_path / "run.toml"
    path.write_text(
        f'[ckpt]\nhf_checkpoint = "{ckpt}"\n'
        '[rollout]\nprompt_data = "p.jsonl"\nbatch_size = 2\nn_samples_per_prompt = 2\nnum_rollout = 4\n'
    )
    return load_config(path, list(overrides))


def fake_iteration(cfg, hf_config, save: Path, step: int, *, complete: bool = True) -> Path:
    """An iteration directory as the controller writes it, without the learner files."""
    layout = {**checkpoint.describe(cfg, hf_config, 10), **checkpoint.schedule_length(cfg, 4)}
    tmp = checkpoint.begin(save, step)
    if not complete:
        final = checkpoint.iteration_dir(save, step)
        tmp.rename(final)
        return final
    state = RolloutState(version=step, epoch=0, offset=0, next_seq=0, dropped=0, pending=[], cached=[])
    return checkpoint.commit(tmp, step, layout=layout, rollout_state=encode_state(state), num_rollout=4)


def test_a_complete_checkpoint_is_resumed_and_an_incomplete_one_is_not(tmp_path, tiny_ckpt) -> None:
    save = tmp_path / "save"
    cfg = config(tmp_path, tiny_ckpt, f"ckpt.load={save}", f"ckpt.save={save}")
    hf = load_hf_config(str(tiny_ckpt))
    assert checkpoint.plan_start(cfg, hf, 10, 4).resume is None  # nothing there yet
    fake_iteration(cfg, hf, save, 2, complete=False)  # a crash before the marker: not a checkpoint
    start = checkpoint.plan_start(cfg, hf, 10, 4)
    assert start.resume is None and start.step == 0 and start.actor_init == str(tiny_ckpt)
    it = fake_iteration(cfg, hf, save, 3)
    assert (save / "latest").read_text() == "3\n" and (it / "complete").is_file()
    assert not list(save.glob("*.tmp"))
    start = checkpoint.plan_start(cfg, hf, 10, 4)
    assert start.resume == str(it) and start.step == 3 and start.push_weights


def test_latest_naming_a_missing_or_incomplete_iteration_is_an_error(tmp_path, tiny_ckpt) -> None:
    save = tmp_path / "save"
    cfg = config(tmp_path, tiny_ckpt, f"ckpt.load={save}")
    hf = load_hf_config(str(tiny_ckpt))
    save.mkdir()
    (save / "latest").write_text("7\n")
    with pytest.raises(ConfigError, match=r"\[ckpt\] load: .*latest names iteration 7, but .*iter_0000007"):
        checkpoint.plan_start(cfg, hf, 10, 4)
    fake_iteration(cfg, hf, save, 7, complete=False)
    with pytest.raises(ConfigError, match=r"\[ckpt\] load: .*iter_0000007, which is incomplete"):
        checkpoint.plan_start(cfg, hf, 10, 4)
    (save / "latest").write_text("seven")
    with pytest.raises(ConfigError, match="does not hold an iteration number"):
        checkpoint.plan_start(cfg, hf, 10, 4)


def test_a_checkpoint_of_another_layout_schedule_or_data_is_refused(tmp_path, tiny_ckpt) -> None:
    save = tmp_path / "save"
    hf = load_hf_config(str(tiny_ckpt))
    base = config(tmp_path, tiny_ckpt, f"ckpt.save={save}", "optimizer.lr_decay_style='cosine'")
    fake_iteration(base, hf, save, 2)
    cases = {
        ("perf.tensor_model_parallel_size=2", "cluster.learner_ranks=2"): [
            "perf.tensor_model_parallel_size: checkpoint 1, config 2",
            "cluster.learner_ranks: checkpoint 1, config 2",
        ],
        ("rollout.num_rollout=6",): [
            "lr_decay_iters (default: num_rollout x num_steps_per_rollout): checkpoint 4"
        ],
        ("rollout.seed=7",): ["rollout.seed: checkpoint 42, config 7"],
    }
    for overrides, messages in cases.items():
        cfg = config(
            tmp_path, tiny_ckpt, f"ckpt.load={save}", "optimizer.lr_decay_style='cosine'", *overrides
        )
        with pytest.raises(ConfigError) as e:
            checkpoint.plan_start(cfg, hf, 10, cfg.rollout.num_rollout)
        assert all(m in str(e.value) for m in messages), str(e.value)
    other = load_hf_config(str(tiny_ckpt))
    other.num_hidden_layers = 5
    cfg = config(tmp_path, tiny_ckpt, f"ckpt.load={save}", "optimizer.lr_decay_style='cosine'")
    with pytest.raises(ConfigError, match=r"ckpt\.hf_checkpoint num_hidden_layers: checkpoint 2, config 5"):
        checkpoint.plan_start(cfg, other, 10, 4)
    cosine_4 = ("optimizer.lr_decay_style='cosine'", "optimizer.lr_decay_iters=4")
    cfg = config(tmp_path, tiny_ckpt, f"ckpt.load={save}", *cosine_4)
    with pytest.raises(ConfigError, match=r"at rollout step 2 and rollout\.num_rollout is 2: nothing"):
        checkpoint.plan_start(cfg, hf, 10, 2)


def test_ref_load_may_be_a_checkpoint_and_must_be_one_of_the_two_kinds(tmp_path, tiny_ckpt) -> None:
    save = tmp_path / "save"
    hf = load_hf_config(str(tiny_ckpt))
    it = fake_iteration(config(tmp_path, tiny_ckpt), hf, save, 2)
    start = checkpoint.plan_start(config(tmp_path, tiny_ckpt, f"ckpt.ref_load={save}"), hf, 10, 4)
    assert start.actor_init == str(it) and start.engine_init == str(tiny_ckpt) and start.push_weights
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"\[ckpt\] ref_load: .* is neither an HF checkpoint"):
        checkpoint.plan_start(config(tmp_path, tiny_ckpt, f"ckpt.ref_load={tmp_path / 'empty'}"), hf, 10, 4)


# --- the producer's account of prompts ----------------------------------------------------------------


def test_every_drawn_prompt_is_trained_dropped_cached_or_pending_at_a_snapshot() -> None:
    """k = 1, batches of 2: at version 1, seven prompts drawn are trained (0, 1), dropped (2), cached (3)
    or pending (4, 5 in batch 1, 6 running); a scheduler resumed from the snapshot re-admits the pending
    groups under their own ids and continues the ids after them."""
    sched, progress = BatchScheduler(2, 1, 4, over_sampling=3), Progress()

    def start(position: int) -> Group:
        prompt = Prompt(index=100 + position, token_ids=(1,), text="", label=None, metadata={})
        g = Group(prompt, [], seq=sched.admit(), position=position)
        progress.opened(g)
        return g

    def place(g: Group) -> int | None:
        batch = sched.finish(g.seq)
        assert batch is not None
        progress.assigned(g, batch)
        return batch

    g = [start(p) for p in range(5)]
    assert [place(g[0]), place(g[1])] == [0, 0]
    sched.finish(g[2].seq, keep=False, reason="zero_reward_std")
    progress.drop(g[2])
    sched.finish(g[3].seq, keep=False, reason="surplus")  # cut when its batch filled, then cached
    progress.set_aside(g[3], [sample(group_id=g[3].seq, prompt_index=103)])
    assert place(g[4]) == 1
    sched.set_version(1)
    progress.advance(1)
    g += [start(5), start(6)]
    assert place(g[5]) == 1
    state = decode_state(
        encode_state(progress.snapshot(version=1, epoch=0, offset=7, next_seq=7, held=[], waiting=[]))
    )
    assert [(p.seq, p.position, p.prompt_index) for p in state.pending] == [
        (4, 4, 104),
        (5, 5, 105),
        (6, 6, 106),
    ]
    assert [x[0].prompt_index for x in state.cached] == [103] and state.dropped == 1
    assert state.version * 2 + state.dropped + len(state.cached) + len(state.pending) == 7
    resumed = BatchScheduler(2, 1, 4, over_sampling=3)
    resumed.resume_at(state.version, state.next_seq)
    assert resumed.filled[:1] == [2] and resumed.free(2) == 4
    assert [resumed.admit(seq=p.seq) for p in state.pending] == [4, 5, 6] and resumed.admit() == 7
    with pytest.raises(ValueError, match="taken or not yet issued"):
        resumed.admit(seq=4)


def test_a_resumed_producer_restarts_pending_groups_first_then_cached_ones(tiny_ckpt) -> None:
    """Batch 0 trained; position 2 was pending (group 2), position 3 cached with three tokens (group 3).
    The resumed producer fills batch 1 with group 2 (same id, same seeds as before) and the cached group
    continued from its tokens, draws no new prompt, and a snapshot before it runs is the state it got."""
    ids = [prompt_ids(tiny_ckpt, text) for text in ("1+1", "2+2", "3+3", "4+4", "5+5")]
    prompts = [Prompt(index=i, token_ids=t, text="", label="2", metadata={}) for i, t in enumerate(ids)]
    rollout_cfg = RolloutConfig(
        prompt_data="-",
        batch_size=2,
        n_samples_per_prompt=2,
        num_rollout=2,
        max_response_len=8,
        max_staleness=1,
        partial_rollout=True,
        shuffle=False,
        custom_rm_path="tests.rewards_custom:length_reward",
    )
    cached = [
        Sample.build(
            prompt_ids=ids[3],
            response_ids=[5, 6, 7],
            rollout_logprobs=[-1.0] * 3,
            versions=[0] * 3,
            group_id=3,
            index=i,
            group_size=2,
            prompt_index=3,
            reward=0.0,
            status="aborted",
            label="2",
            seed=77 + i,
        )
        for i in range(2)
    ]
    state = RolloutState(
        version=1, epoch=0, offset=4, next_seq=4, dropped=0, pending=[Pending(2, 2, 2)], cached=[cached]
    )

    async def scenario() -> tuple[list[Sample], dict, RolloutState]:
        buffer = BufferActor(batch_size=2)
        buffer.restore_partials(state.cached)
        rewards = RewardPool.from_config(rollout_cfg)
        try:
            sink = ZmqSampleSink(buffer.address())
            producer = Producer(
                rollout_cfg,
                EvalConfig(),
                AutoTokenizer.from_pretrained(tiny_ckpt),
                prompts,
                {},
                [Local(actor(tiny_ckpt, "transformers"))],
                sink,
                rewards,
                num_batches=2,
                partials=BufferPartials(sink, buffer),
                resume=state,
            )
            before = producer.snapshot(1)
            await producer.run()
            samples, _ = await asyncio.to_thread(buffer.get_batch, 1, 30)
            sink.close()
            return samples, producer.ledger(), before
        finally:
            rewards.close()
            buffer.close()

    samples, ledger, before = asyncio.run(scenario())
    assert encode_state(before) == encode_state(state)
    assert [(x.group_id, x.prompt_index) for x in samples if x.index == 0] == [(2, 2), (4, 3)]
    assert [x.seed for x in samples[:2]] == [derive_seed(rollout_cfg.seed, TRAIN, 2, i) for i in range(2)]
    assert all(x.response_array[:3].tolist() == [5, 6, 7] and x.seed == 77 + x.index for x in samples[2:])
    assert ledger["groups_pending_restored"] == 1 and ledger["partials_restored"] == 1
    assert ledger["partials_resumed"] == 1 and ledger["groups_started"] == ledger["groups_assigned"] == 2
