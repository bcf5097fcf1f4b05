"""The static-cache engine: its forward equals transformers', its draws equal the transformers engine's,
continuous batching does not change a request's result, and aborts, in-flight updates, stops, budgets
and slot reuse behave as the engine contract says (CPU, eager). CUDA-graph replay: tests marked gpu."""

from __future__ import annotations

import asyncio
import inspect

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from engine.errors import ConfigError, EngineError
from engine.hf_config import load_hf_config
from engine.rollout.config import InferenceConfig
from engine.rollout.dense_forward import DenseForward
from engine.rollout.device_sampling import as_int64_seeds, device_uniforms
from engine.rollout.engine_choice import build_engine
from engine.rollout.engines import EmbeddedEngineActor
from engine.rollout.hf_engine import HFEngine, cache_kwarg
from engine.rollout.kv_cache import SlotCache
from engine.rollout.sampling import position_uniforms
from engine.rollout.static_engine import StaticEngine
from engine.wire import GenerateRequest, SamplingParams
from tests.helpers import make_checkpoint, prompt_ids

TEXTS = ["1+2", "34+56", "7", "hello there", "99+99", "x"]
ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 10000.0,
    },
}


def requests(ckpt, n=6, max_new=20, seed0=100, rid0=0, **params) -> list[GenerateRequest]:
    return [
        GenerateRequest(
            rid=rid0 + i,
            prompt_ids=prompt_ids(ckpt, TEXTS[i % len(TEXTS)]),
            params=SamplingParams(max_new_tokens=max_new, **params),
            seed=seed0 + i,
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def static(tiny_ckpt):
    return StaticEngine(str(tiny_ckpt), max_batch_size=4, context_length=64)


@pytest.mark.parametrize(
    "family,tied,rope",
    [
        ("qwen2", True, None),
        ("qwen2", False, None),
        ("llama", False, None),
        ("qwen3", True, None),
        ("llama", True, "linear"),
        ("qwen3", False, "llama3"),
    ],
)
def test_logits_equal_transformers_at_prefill_and_every_decode_step(tmp_path, family, tied, rope) -> None:
    extra = {"rope_parameters": ROPES[rope]} if rope else {}
    if family == "llama":
        extra["attention_bias"] = True  # q/k/v and o biases
    ckpt = make_checkpoint(tmp_path / family, family, tied=tied, **extra)
    config = load_hf_config(str(ckpt))
    reference = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    forward = DenseForward(model, config, positions=64)
    cache = SlotCache(
        layers=config.num_hidden_layers,
        slots=4,
        context_length=64,
        kv_heads=forward.kv_heads,
        head_dim=forward.head_dim,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 110, (n,), generator=g) for n in (20, 18, 30)]
    prompt = [5, 9, 3]
    with torch.no_grad():
        full = [reference(input_ids=s[None]).logits[0] for s in seqs]
        ids = torch.zeros(3, max(prompt), dtype=torch.long)
        for i, (s, n) in enumerate(zip(seqs, prompt, strict=True)):
            ids[i, :n] = s[:n]
        # sequence i goes to slot slot_of[i]; decode rows are slots 0..2
        slot_of = [2, 0, 1]
        logits = forward.prefill(cache, ids, torch.tensor(prompt), torch.tensor(slot_of))
        for i in range(3):
            torch.testing.assert_close(logits[i], full[i][prompt[i] - 1], atol=1e-4, rtol=1e-4)
        seq_in_slot = [slot_of.index(r) for r in range(3)]
        pos = [prompt[i] for i in seq_in_slot]
        for _ in range(8):
            tokens = torch.tensor([seqs[i][p] for i, p in zip(seq_in_slot, pos, strict=True)])
            logits = forward.decode(cache, tokens, torch.tensor(pos), torch.arange(3), max(pos) + 1)
            for row, (i, p) in enumerate(zip(seq_in_slot, pos, strict=True)):
                torch.testing.assert_close(logits[row], full[i][p], atol=1e-4, rtol=1e-4)
            pos = [p + 1 for p in pos]


def test_device_uniforms_are_the_numpy_hash_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    seeds = np.concatenate(
        [
            rng.integers(0, 2**63, 500, dtype=np.uint64) * np.uint64(2),
            np.array([0, 1, 2**63, 2**64 - 1], np.uint64),
        ]
    )
    positions = rng.integers(0, 10**6, len(seeds))
    want = position_uniforms(seeds, positions)
    got = device_uniforms(torch.from_numpy(as_int64_seeds(seeds)), torch.from_numpy(positions))
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "params", [{}, {"temperature": 0.7, "top_p": 0.9}, {"top_k": 5}, {"temperature": 0.0}], ids=str
)
def test_same_tokens_and_logprobs_as_the_transformers_engine(tiny_ckpt, static, params) -> None:
    """Twelve requests through four slots: most of them join while others are decoding."""
    reqs = requests(tiny_ckpt, n=12, **params)
    want = HFEngine(str(tiny_ckpt)).generate(reqs)
    got = static.generate(reqs)
    assert len({len(r.token_ids) for r in got}) > 1  # requests leave at different steps
    for a, b in zip(want, got, strict=True):
        assert (b.rid, b.token_ids, b.finish_reason) == (a.rid, a.token_ids, a.finish_reason)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
        assert b.versions == a.versions


def test_a_request_joining_mid_batch_gets_its_result_alone(tiny_ckpt, static) -> None:
    first, later = requests(tiny_ckpt, n=3, max_new=30), requests(tiny_ckpt, n=2, rid0=10, seed0=7)
    alone = {r.rid: static.generate([r])[0] for r in first + later}
    batch = static.start(first)
    results = []
    for _ in range(5):
        results += batch.step()
    results += batch.join(later)
    while not batch.done:
        results += batch.step()
    assert sorted(r.rid for r in results) == sorted(alone)
    for r in results:
        assert r.token_ids == alone[r.rid].token_ids
        assert r.logprobs == pytest.approx(alone[r.rid].logprobs, abs=1e-5)


def test_a_freed_slot_is_reused_at_once(tiny_ckpt) -> None:
    engine = StaticEngine(str(tiny_ckpt), max_batch_size=2, context_length=64)
    short, long = requests(tiny_ckpt, n=2, max_new=30)
    short = GenerateRequest(
        rid=0, prompt_ids=short.prompt_ids, params=SamplingParams(max_new_tokens=2), seed=1
    )
    batch = engine.start([short, long])
    assert batch.free_slots == 0
    finished = batch.step()  # the short request's second token: it leaves, the long one takes slot 0
    assert [r.rid for r in finished] == [0] and batch.free_slots == 1
    assert [r.rid for r in batch.requests] == [long.rid]
    (newcomer,) = requests(tiny_ckpt, n=1, rid0=5, seed0=55)
    batch.join([newcomer])
    assert batch.free_slots == 0 and [r.rid for r in batch.requests] == [long.rid, 5]
    results = {r.rid: r for r in finished}
    while not batch.done:
        results.update({r.rid: r for r in batch.step()})
    assert results[5].token_ids == engine.generate([newcomer])[0].token_ids
    assert results[long.rid].token_ids == engine.generate([long])[0].token_ids


def test_abort_returns_the_prefix_and_leaves_the_others_alone(tiny_ckpt, static) -> None:
    reqs = requests(tiny_ckpt, n=3, max_new=30, seed0=300)
    alone = {r.rid: static.generate([r])[0] for r in reqs}
    batch = static.start(reqs)
    for _ in range(2):
        assert not batch.step()  # nobody finishes in the first steps with these seeds
    (cut,) = batch.abort({1})
    assert cut.rid == 1 and cut.finish_reason == "abort" and len(cut.token_ids) == 3
    assert cut.token_ids == alone[1].token_ids[:3]
    rest = []
    while not batch.done:
        rest += batch.step()
    assert {r.rid: r.token_ids for r in rest} == {0: alone[0].token_ids, 2: alone[2].token_ids}


def test_in_flight_update_versions_and_new_weights_take_effect(tiny_ckpt) -> None:
    engine = StaticEngine(str(tiny_ckpt), max_batch_size=4, context_length=64)
    reqs = requests(tiny_ckpt, n=2, max_new=30, seed0=300)
    old = {r.rid: r for r in engine.generate(reqs)}
    changed = {k: v * 1.1 for k, v in engine.state_dict().items()}
    batch = engine.start(reqs)
    for _ in range(3):
        batch.step()
    engine.load_weights(changed, version=1)  # between steps: "continue"
    results = []
    while not batch.done:
        results += batch.step()
    for r in results:
        assert r.versions == [0] * 4 + [1] * (len(r.token_ids) - 4)
        assert r.token_ids[:4] == old[r.rid].token_ids[:4]
        # In flight: the cached keys/values of earlier positions stay those of the old weights. So the
        # reference keeps a transformers cache of prompt + 3 tokens made with the old weights and
        # computes the rest with the new ones.
        model = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
        prompt, toks = list(reqs[r.rid].prompt_ids), r.token_ids
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt + toks[:3]]), cache=cache, use_cache=True)
            model.load_state_dict(changed, strict=False)
            logits = model(input_ids=torch.tensor([toks[3:-1]]), cache=cache, use_cache=True).logits[0]
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(toks[4:])[:, None]).squeeze(-1)
        assert r.logprobs[4:] == pytest.approx(want.tolist(), abs=1e-4)
        assert r.logprobs[4:] != pytest.approx(old[r.rid].logprobs[4:], abs=1e-2)


def test_stops_budgets_and_the_context_length(tiny_ckpt) -> None:
    engine = StaticEngine(str(tiny_ckpt), max_batch_size=4, context_length=40)
    ids = prompt_ids(tiny_ckpt, "1+2")
    prompt = len(ids)
    tries = [
        GenerateRequest(rid=s, prompt_ids=ids, params=SamplingParams(max_new_tokens=30), seed=s)
        for s in range(40)
    ]
    first = next(r for r in engine.generate(tries) if r.finish_reason == "length")  # a long response

    def run(**params):
        return engine.generate(
            [GenerateRequest(rid=0, prompt_ids=ids, seed=first.rid, params=SamplingParams(**params))]
        )[0]

    toks = first.token_ids
    at = next(i for i in range(2, 30) if toks[i] not in toks[:i])  # a token not drawn before
    stopped = run(max_new_tokens=30, stop_token_ids=(toks[at],))
    assert stopped.token_ids == toks[: at + 1] and stopped.finish_reason == "stop"
    none = run(max_new_tokens=0)
    assert none.token_ids == [] and none.finish_reason == "length"
    assert len(run(max_new_tokens=2).token_ids) == 2
    capped = run(max_new_tokens=100)  # the slot holds 40 positions: prompt + response stop there
    assert capped.finish_reason == "length" and prompt + len(capped.token_ids) == 40
    assert capped.token_ids[:5] == first.token_ids[:5]
    too_long = GenerateRequest(
        rid=1, prompt_ids=tuple(range(1, 41)), params=SamplingParams(max_new_tokens=4), seed=1
    )
    with pytest.raises(ConfigError, match=r"\[inference\] context_length.*40 tokens"):
        engine.generate([too_long])


def test_engine_choice_and_refusals(tmp_path, tiny_ckpt) -> None:
    cpu = InferenceConfig(device="cpu")
    assert type(build_engine(str(tiny_ckpt), cpu, seed=0)) is HFEngine  # auto on the CPU: transformers
    static = InferenceConfig(device="cpu", engine_impl="static", max_batch_size=2, context_length=32)
    engine = build_engine(str(tiny_ckpt), static, seed=0)
    assert isinstance(engine, StaticEngine) and engine.kv.keys.shape[1:3] == (2, 64)
    moe = make_checkpoint(tmp_path / "moe", "qwen3_moe")
    with pytest.raises(ConfigError, match=r"\[inference\] engine_impl.*mixture-of-experts"):
        build_engine(str(moe), static, seed=0)
    assert type(build_engine(str(moe), cpu, seed=0)) is HFEngine
    dynamic = make_checkpoint(
        tmp_path / "dyn", "llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    )
    with pytest.raises(ConfigError, match="rope type 'dynamic'"):
        build_engine(str(dynamic), static, seed=0)
    with pytest.raises(ConfigError, match=r"context_length.*must be > 0"):
        InferenceConfig(context_length=0).check()


def test_bucket_padding_changes_no_result(tiny_ckpt, static) -> None:
    """Decode steps padded to the CUDA-graph buckets (rows 1, 2, 4; key spans of 64) give the same draws:
    padding rows only touch free slots and the span mask hides what lies past each row's position."""
    padded = StaticEngine(str(tiny_ckpt), max_batch_size=4, context_length=100)
    padded.runner.pad = True
    assert padded.runner.row_buckets == [1, 2, 4] and padded.runner.span_buckets == [64, 128]
    reqs = requests(tiny_ckpt, n=7, max_new=40, temperature=0.9, top_k=30)
    for a, b in zip(static.generate(reqs), padded.generate(reqs), strict=True):
        assert (b.token_ids, b.finish_reason) == (a.token_ids, a.finish_reason)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)


def test_the_actor_lets_requests_join_a_running_batch(tiny_ckpt) -> None:
    cfg = InferenceConfig(
        batch_wait_ms=0.0, engine_impl="static", device="cpu", max_batch_size=4, context_length=64
    )
    first, later = requests(tiny_ckpt, n=2, max_new=30, seed0=300), requests(tiny_ckpt, n=2, rid0=10, seed0=7)
    alone = {r.rid: r for r in StaticEngine(str(tiny_ckpt), max_batch_size=4).generate(first + later)}

    async def scenario():
        actor = EmbeddedEngineActor(str(tiny_ckpt), cfg, 0, 1, {})
        task = asyncio.ensure_future(actor.generate(first))
        while not (actor._running is not None and actor._running.steps >= 3):
            await asyncio.sleep(0.001)
        running = actor._running
        second = asyncio.ensure_future(actor.generate(later))
        most = 0
        while not second.done():  # they join the batch that is still decoding the first pair
            most = max(most, len(running.requests) if actor._running is running else 0)
            await asyncio.sleep(0)
        assert most == 4
        return await task + await second

    for r in asyncio.run(scenario()):
        assert r.token_ids == alone[r.rid].token_ids and r.finish_reason == alone[r.rid].finish_reason


# --- CUDA graphs (run on the GPU host: pytest -m gpu) ------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replay_equals_eager(tiny_ckpt, dtype) -> None:
    """Joins mid-run, rows padded up to the bucket, graphs captured while requests are live. Padded
    shapes pick other matmul kernels than the eager step's exact ones, so in bf16 a draw can flip where
    the uniform falls within rounding of a token boundary: there most requests, not all, must agree."""
    kw = dict(dtype=dtype, device="cuda", max_batch_size=8, context_length=64)
    eager = StaticEngine(str(tiny_ckpt), cuda_graph=False, **kw)
    graphs = StaticEngine(str(tiny_ckpt), cuda_graph=True, **kw)
    tol = 1e-4 if dtype == "float32" else 0.05
    for params in ({}, {"temperature": 0.7, "top_p": 0.9, "top_k": 20}, {"temperature": 0.0}):
        reqs = requests(tiny_ckpt, n=13, max_new=30, **params)
        want, got = eager.generate(reqs), graphs.generate(reqs)
        assert graphs.runner.graphs > 1
        same = 0
        for a, b in zip(want, got, strict=True):
            common = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
            common = min(len(a.token_ids), len(b.token_ids)) if common is None else common
            assert common > 0
            assert b.logprobs[:common] == pytest.approx(a.logprobs[:common], abs=tol)
            same += (b.token_ids, b.finish_reason) == (a.token_ids, a.finish_reason)
        assert same == len(reqs) if dtype == "float32" else same >= len(reqs) - 2


def teacher_forced(model, prompt: tuple[int, ...], tokens: list[int]) -> list[float]:
    """log_softmax(logits) of each response token from one unpadded forward of prompt + response."""
    ids = torch.tensor([[*prompt, *tokens]], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(tokens)].float()
    picked = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens, device=model.device)[:, None])
    return picked.squeeze(-1).tolist()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_each_engine_reports_the_logprobs_of_a_teacher_forced_forward(tiny_ckpt, device) -> None:
    """Both engines, batched and padded their own way, against one unpadded forward per response
    (float32, temperature 1): the reported log-probs are those of the tokens given the prefix."""
    reqs = requests(tiny_ckpt, n=12, max_new=30, temperature=1.0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_ckpt), dtype=torch.float32).to(device).eval()
    engines = {
        "transformers": HFEngine(str(tiny_ckpt), device=device),
        "static": StaticEngine(str(tiny_ckpt), device=device, max_batch_size=4, context_length=64),
    }
    for name, engine in engines.items():
        for req, r in zip(reqs, engine.generate(reqs), strict=True):
            want = teacher_forced(model, req.prompt_ids, r.token_ids)
            assert r.logprobs == pytest.approx(want, abs=1e-4), (name, r.rid)


@pytest.mark.gpu
def test_weight_update_reaches_captured_graphs(tiny_ckpt) -> None:
    engine = StaticEngine(str(tiny_ckpt), device="cuda", max_batch_size=4, context_length=64)
    reqs = requests(tiny_ckpt, n=4, max_new=30)
    engine.generate(reqs)  # captures the graphs with the old weights
    changed = {k: v * 1.1 for k, v in engine.state_dict().items()}
    engine.load_weights(changed, version=2)
    got = engine.generate(reqs)
    fresh = StaticEngine(str(tiny_ckpt), device="cuda", max_batch_size=4, context_length=64, cuda_graph=False)
    fresh.load_weights(changed, version=2)
    want = fresh.generate(reqs)
    for a, b in zip(want, got, strict=True):
        assert b.token_ids == a.token_ids and set(b.versions) == {2}
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)


def release_resume_round(engine: StaticEngine, reqs: list[GenerateRequest]) -> None:
    before = engine.generate(reqs)
    engine.release_memory()
    assert engine.kv.keys.untyped_storage().size() == 0 and engine.runner.graphs == 0
    engine.resume_memory()
    after = engine.generate(reqs)
    for a, b in zip(before, after, strict=True):
        assert (b.token_ids, b.finish_reason) == (a.token_ids, a.finish_reason)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-6)


def test_released_kv_memory_comes_back_and_decoding_is_unchanged(tiny_ckpt) -> None:
    """Colocated mode: the cache gives its memory back while the learner trains, then decodes as before."""
    engine = StaticEngine(str(tiny_ckpt), max_batch_size=4, context_length=64)
    release_resume_round(engine, requests(tiny_ckpt, n=6, max_new=20))


@pytest.mark.gpu
def test_released_memory_and_recaptured_graphs_decode_as_before(tiny_ckpt) -> None:
    engine = StaticEngine(str(tiny_ckpt), device="cuda", max_batch_size=4, context_length=64)
    reqs = requests(tiny_ckpt, n=6, max_new=20)
    engine.generate(reqs)
    assert engine.runner.graphs > 0
    release_resume_round(engine, reqs)
    assert engine.runner.graphs > 0  # captured again on the new cache


def test_the_kv_cache_goes_under_the_name_the_installed_transformers_takes(tiny_ckpt) -> None:
    """transformers renamed forward's `past_key_values` to `cache` in 5.24 and swallows unknown keywords,
    so the engine must pick the name from the signature (the GPU host has an older release)."""

    class Before(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs): ...

    class After(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs): ...

    class Neither(torch.nn.Module):
        def forward(self, input_ids, **kwargs): ...

    assert cache_kwarg(Before()) == "past_key_values" and cache_kwarg(After()) == "cache"
    with pytest.raises(EngineError, match="takes neither"):
        cache_kwarg(Neither())
    engine = HFEngine(str(tiny_ckpt))
    assert engine.cache_kw in inspect.signature(engine.model.forward).parameters
