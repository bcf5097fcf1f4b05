"""The embedded engine: stop tokens, budgets, log-probs, seeded draws and in-place weight updates, for
both implementations (the transformers engine and the static-cache engine, run eagerly on the CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.rollout.hf_engine import HFEngine, WeightUpdateError
from engine.rollout.static_engine import StaticEngine
from engine.wire import GenerateRequest, SamplingParams
from tests.helpers import prompt_ids


@pytest.fixture(scope="module", params=[HFEngine, StaticEngine], ids=["transformers", "static"])
def engine_cls(request):
    return request.param


@pytest.fixture(scope="module")
def engine(tiny_ckpt, engine_cls):
    return engine_cls(str(tiny_ckpt), seed=0)


def requests(tiny_ckpt, n=6, max_new=12, seed0=100, **params):
    texts = ["1+2", "34+56", "7", "hello there", "99+99", "x"]
    return [
        GenerateRequest(
            rid=i,
            prompt_ids=prompt_ids(tiny_ckpt, texts[i % len(texts)]),
            params=SamplingParams(max_new_tokens=max_new, **params),
            seed=seed0 + i,
        )
        for i in range(n)
    ]


def test_budgets_stops_and_versions(engine, tiny_ckpt) -> None:
    reqs = requests(tiny_ckpt, max_new=12)
    eos = next(iter(engine.eos_ids))
    results = engine.generate(reqs)
    assert [r.rid for r in results] == [r.rid for r in reqs]
    for r in results:
        assert 1 <= len(r.token_ids) <= 12 and len(r.logprobs) == len(r.versions) == len(r.token_ids)
        assert set(r.versions) == {engine.version}
        if r.finish_reason == "stop":
            assert r.token_ids[-1] == eos and eos not in r.token_ids[:-1]
        else:
            assert r.finish_reason == "length" and len(r.token_ids) == 12
    # a stop token of the request's own ends generation right there
    first = results[0].token_ids[0]
    stopped = engine.generate(
        [
            GenerateRequest(
                rid=0,
                prompt_ids=reqs[0].prompt_ids,
                params=SamplingParams(max_new_tokens=12, stop_token_ids=(first,)),
                seed=100,
            )
        ]
    )
    assert stopped[0].token_ids == [first] and stopped[0].finish_reason == "stop"


def test_logprobs_match_a_full_forward(engine, tiny_ckpt) -> None:
    hf = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    for r, req in zip(
        engine.generate(requests(tiny_ckpt, temperature=0.8, top_p=0.9)), requests(tiny_ckpt), strict=True
    ):
        ids = torch.tensor([list(req.prompt_ids) + r.token_ids])
        with torch.no_grad():
            logits = hf(input_ids=ids).logits[0, len(req.prompt_ids) - 1 : -1]
        want = torch.log_softmax(logits / 0.8, -1).gather(-1, torch.tensor(r.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(r.logprobs), want, atol=1e-4)


def test_seeded_requests_ignore_batch_company(engine, tiny_ckpt) -> None:
    reqs = requests(tiny_ckpt)
    together = engine.generate(reqs)
    alone = [engine.generate([r])[0] for r in reqs]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    other = engine.generate(requests(tiny_ckpt, seed0=999))
    assert [r.token_ids for r in other] != [r.token_ids for r in together]


def test_weight_update_in_place_and_refusals(tiny_ckpt, engine_cls) -> None:
    engine = engine_cls(str(tiny_ckpt))
    state = engine.state_dict()
    before = engine.model.model.embed_tokens.weight.data_ptr()
    changed = {k: v * 1.5 for k, v in state.items()}
    engine.load_weights(changed, version=3)
    assert engine.version == 3 and engine.model.model.embed_tokens.weight.data_ptr() == before
    assert torch.equal(engine.model.model.embed_tokens.weight, changed["model.embed_tokens.weight"])
    with pytest.raises(WeightUpdateError, match="unknown"):
        engine.load_weights({**state, "bogus.weight": torch.zeros(1)}, 4)
    with pytest.raises(WeightUpdateError, match="missing"):
        engine.load_weights({k: v for k, v in state.items() if "layers.0" not in k}, 4)
    bad = dict(state)
    bad["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(WeightUpdateError, match=r"model\.norm\.weight"):
        engine.load_weights(bad, 4)
    assert engine.version == 3  # a refused update changes nothing
