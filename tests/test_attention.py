"""SDPA core attention against Megatron's DotProductAttention and transformers, padded and packed.

Models are built in this process (a one-rank gloo group) from tiny random HF checkpoints of each family.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.errors import ConfigError
from engine.hf_config import load_hf_config
from engine.learner import hf_bridge
from engine.learner.attention import packed_seq_params
from engine.learner.batching import Packing, chunk_by_tokens, make_micro_batch
from engine.learner.config import AlgoConfig
from engine.learner.loss import policy_objective, token_logprobs
from engine.learner.weights import load_hf_state
from engine.learner.worker import LearnerWorker
from tests.helpers import FAMILIES, make_checkpoint, sample

LENGTHS = [7, 12, 3, 9]


@pytest.fixture(scope="module")
def parallel(tmp_path_factory):
    from engine.learner.parallel import init_parallel

    init_parallel(0, 1, 1, f"file://{tmp_path_factory.mktemp('dist') / 'store'}", seed=0)


def build(path, attention: str) -> torch.nn.Module:
    config = load_hf_config(str(path))
    shape = hf_bridge.shape_of(config)
    tconfig = hf_bridge.transformer_config(config, shape, tp=1, params_dtype=torch.float32)
    model = hf_bridge.build_gpt_model(config, shape, tconfig, attention=attention)
    hf_bridge.load_hf_weights(model, load_hf_state(str(path)), shape, 0, 1)
    return model.eval()


def padded_batch(lengths: list[int], vocab: int, seed: int = 0) -> torch.Tensor:
    """Right-padded rows of random tokens, padding filled with random tokens too."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (len(lengths), max(lengths)), generator=g)


def causal(s: int) -> torch.Tensor:
    return torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, parallel):
    path = make_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", request.param, tied=False, seed=7)
    vocab = load_hf_config(str(path)).vocab_size
    return request.param, path, vocab, build(path, "local"), build(path, "sdpa")


@torch.no_grad()
def test_sdpa_matches_local_attention_and_transformers(family) -> None:
    name, path, vocab, local, sdpa = family
    tokens = padded_batch(LENGTHS, vocab)
    b, s = tokens.shape
    positions = torch.arange(s).expand(b, s)
    out_local = local(tokens, positions, attention_mask=causal(s))[..., :vocab]
    out_sdpa = sdpa(tokens, positions, attention_mask=causal(s))[..., :vocab]
    assert out_sdpa.abs().max() > 1.0  # not a degenerate model
    torch.testing.assert_close(out_sdpa, out_local, atol=1e-5, rtol=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for i, n in enumerate(LENGTHS):
        ref = hf(input_ids=tokens[i : i + 1, :n]).logits[0]
        torch.testing.assert_close(out_sdpa[i, :n], ref, atol=1e-4, rtol=1e-4, msg=name)


@torch.no_grad()
def test_packed_forward_equals_separate_forwards(family) -> None:
    name, _, vocab, _, sdpa = family
    tokens = padded_batch(LENGTHS, vocab, seed=1)
    packing = Packing.of(tokens, LENGTHS)
    packed = sdpa(
        packing.tokens,
        packing.positions,
        attention_mask=None,
        packed_seq_params=packed_seq_params(LENGTHS),
    )[0, :, :vocab]
    start = 0
    for i, n in enumerate(LENGTHS):
        alone = sdpa(tokens[i : i + 1, :n], torch.arange(n)[None], attention_mask=causal(n))[0, :, :vocab]
        torch.testing.assert_close(packed[start : start + n], alone, atol=1e-5, rtol=1e-5, msg=name)
        start += n
    assert start == packed.shape[0]


@torch.no_grad()
def test_packed_sequences_do_not_see_each_other(family) -> None:
    """Changing one packed sequence changes its own logits and no other's."""
    _, _, vocab, _, sdpa = family
    tokens = padded_batch(LENGTHS, vocab, seed=2)
    params = packed_seq_params(LENGTHS)
    first = Packing.of(tokens, LENGTHS)
    tokens[1, : LENGTHS[1]] = (tokens[1, : LENGTHS[1]] % (vocab - 1)) + 1
    second = Packing.of(tokens, LENGTHS)
    a = sdpa(first.tokens, first.positions, attention_mask=None, packed_seq_params=params)
    b = sdpa(second.tokens, second.positions, attention_mask=None, packed_seq_params=params)
    start, end = LENGTHS[0], LENGTHS[0] + LENGTHS[1]
    assert not torch.allclose(a[:, start:end], b[:, start:end])
    assert torch.equal(a[:, :start], b[:, :start]) and torch.equal(a[:, end:], b[:, end:])


def test_padding_never_reaches_the_loss_and_packing_changes_nothing(family) -> None:
    """The learner's log-probs (LearnerWorker._logprobs) of padded and packed micro-batches agree on every
    response position, and whatever sits in padding changes neither them nor the loss."""
    _, _, vocab, _, sdpa = family
    xs = [
        sample(group_id=i, n=n, prompt_ids=list(range(5, 5 + p)), response_ids=list(range(30, 30 + n)))
        for i, (p, n) in enumerate([(4, 3), (9, 7), (2, 1), (6, 5)])
    ]
    xs[1] = sample(group_id=1, n=7, prompt_ids=list(range(5, 14)), loss_mask=[1, 0, 0, 1, 1, 1, 0])
    learner = SimpleNamespace(
        shape=SimpleNamespace(vocab=vocab), temperature=0.7, _token_logprobs=token_logprobs
    )
    padded = make_micro_batch(xs, [0, 1, 2, 3])
    packed = make_micro_batch(xs, [0, 1, 2, 3], packed=True)
    algo = AlgoConfig(entropy_coef=0.01)

    def loss(mb):
        logp, entropy = LearnerWorker._logprobs(learner, mb, sdpa(**mb.model_inputs()), with_entropy=True)
        mb.advantages = torch.linspace(-1, 1, mb.span.numel()).reshape(mb.span.shape) * mb.span
        value, _, _ = policy_objective(
            algo,
            logp=logp,
            old_logp=logp.detach() + 0.1 * mb.span,
            rollout_logp=mb.rollout_logp,
            advantages=mb.advantages,
            mask=mb.mask,
            entropy=entropy,
            ref_logp=None,
            tokens=float(mb.mask.sum()),
            samples=4.0,
        )
        return logp, entropy, value

    with torch.no_grad():
        logp, entropy, value = loss(padded)
        logp_packed, entropy_packed, value_packed = loss(packed)
        lengths = [len(x.prompt_array) + x.response_len for x in xs]
        g = torch.Generator().manual_seed(0)
        for i, n in enumerate(lengths):  # other tokens in the padding (targets is a view of tokens)
            padded.tokens[i, n:] = torch.randint(1, vocab, (padded.tokens.shape[1] - n,), generator=g)
        logp_noise, entropy_noise, value_noise = loss(padded)
    span = padded.span > 0
    assert padded.mask.sum() < padded.span.sum() < span.numel()  # mask, span and padding all differ
    torch.testing.assert_close(logp_packed[span], logp[span], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy_packed[span], entropy[span], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(value_packed, value, atol=1e-6, rtol=1e-5)
    assert not torch.equal(logp_noise, logp)  # the padding positions did change...
    torch.testing.assert_close(logp_noise[span], logp[span], atol=1e-6, rtol=0)  # ...nothing else
    torch.testing.assert_close(entropy_noise[span], entropy[span], atol=1e-6, rtol=0)
    torch.testing.assert_close(value_noise, value, atol=1e-7, rtol=0)


def test_local_attention_rejects_packed_input_and_unknown_backend(family) -> None:
    _, path, vocab, local, _ = family
    tokens = padded_batch(LENGTHS, vocab)
    packing = Packing.of(tokens, LENGTHS)
    with pytest.raises(AssertionError, match="Packed sequence is not supported"):
        local(packing.tokens, packing.positions, None, packed_seq_params=packed_seq_params(LENGTHS))
    config = load_hf_config(str(path))
    shape = hf_bridge.shape_of(config)
    tconfig = hf_bridge.transformer_config(config, shape, tp=1, params_dtype=torch.float32)
    with pytest.raises(ValueError, match="sdpa"):
        hf_bridge.build_gpt_model(config, shape, tconfig, attention="flash")


def test_packing_maps_back_to_the_padded_layout() -> None:
    tokens = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    p = Packing.of(tokens, [3, 2, 4])
    assert p.tokens.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert p.positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # a packed per-position value: the index of the position it sits at
    from engine.learner.batching import MicroBatch

    mb = MicroBatch(tokens, tokens, tokens[:, 1:], *(torch.zeros(3, 3),) * 3, torch.arange(3), packing=p)
    out = mb.unpack(torch.arange(1.0, 9.0)[None])
    # position 2 predicts token 8 of the next sample and position 4 token 1: neither is read
    assert out.tolist() == [[1.0, 2.0, 0.0], [4.0, 0.0, 0.0], [6.0, 7.0, 8.0]]
    assert torch.equal(mb.unpack(mb.model_targets().float()), (tokens[:, 1:] * (out > 0)).float())


def test_chunk_by_tokens_fits_the_budget_and_keeps_every_sample() -> None:
    indices = [3, 5, 7, 9, 11, 13]
    lengths = [10, 4, 7, 3, 6, 9]
    groups = chunk_by_tokens(indices, lengths, 13)
    assert sorted(i for g in groups for i in g) == indices
    size = dict(zip(indices, lengths, strict=True))
    assert all(sum(size[i] for i in g) <= 13 for g in groups)
    assert len(groups) == 3  # 39 tokens need at least 3 groups of 13
    assert all(g == sorted(g) for g in groups)
    with pytest.raises(ConfigError, match=r"max_tokens_per_gpu: sample 3 has 10 tokens"):
        chunk_by_tokens(indices, lengths, 6)
