"""Prompt data: records checked with file and line, chat template applied, order seeded and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.errors import DataError
from engine.rollout.data import PromptOrder, load_prompts


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    return AutoTokenizer.from_pretrained(tiny_ckpt)


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def record(content: str = "1+2", label: str = "3") -> str:
    return json.dumps({"input": [{"role": "user", "content": content}], "label": label, "metadata": {"k": 1}})


def test_chat_template_and_fields(tmp_path, tokenizer) -> None:
    prompts = load_prompts(
        write(tmp_path, [record("12+5", "17"), "", record()]), tokenizer, apply_chat_template=True
    )
    assert [p.index for p in prompts] == [0, 2]
    assert prompts[0].text == "<|user|>12+5<|assistant|>"
    assert tokenizer.decode(prompts[0].token_ids, skip_special_tokens=False) == prompts[0].text
    assert prompts[0].label == "17" and prompts[0].metadata == {"k": 1}


def test_plain_string_inputs(tmp_path, tokenizer) -> None:
    path = write(tmp_path, [json.dumps({"question": "2+2=", "answer": 4})])
    (p,) = load_prompts(path, tokenizer, input_key="question", label_key="answer")
    assert p.text == "2+2=" and p.label == "4"


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"input": [', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"label": "3"}), "missing input key 'input'"),
        (json.dumps({"input": "plain text", "label": "3"}), "must be a list of {role, content} messages"),
        (
            json.dumps({"input": [{"role": "user"}], "label": "3"}),
            "must be a list of {role, content} messages",
        ),
        (json.dumps({"input": [{"role": "user", "content": "x"}]}), "missing label key 'label'"),
        (
            json.dumps({"input": [{"role": "user", "content": "x"}], "label": "1", "metadata": 5}),
            "must be a JSON object",
        ),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, tokenizer, bad, message) -> None:
    path = write(tmp_path, [record(), record(), bad, record()])
    with pytest.raises(DataError, match=message) as err:
        load_prompts(path, tokenizer, apply_chat_template=True)
    assert err.value.line == 3 and err.value.file == str(path)
    assert f"{path}:3:" in str(err.value)


def test_missing_and_empty_files(tmp_path, tokenizer) -> None:
    with pytest.raises(DataError, match="cannot open"):
        load_prompts(tmp_path / "absent.jsonl", tokenizer)
    with pytest.raises(DataError, match="no records"):
        load_prompts(write(tmp_path, [""]), tokenizer)


def test_order_is_a_seeded_permutation_per_epoch() -> None:
    order = PromptOrder(10, shuffle=True, seed=7)
    epochs = [[order.next()[1] for _ in range(10)] for _ in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(10))
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    again = PromptOrder(10, shuffle=True, seed=7)
    assert [again.next()[1] for _ in range(30)] == [i for e in epochs for i in e]
    assert PromptOrder(4, shuffle=False, seed=0).next() == (0, 0)


def test_order_resumes_from_state() -> None:
    full = PromptOrder(7, shuffle=True, seed=3)
    stream = [full.next() for _ in range(20)]
    first = PromptOrder(7, shuffle=True, seed=3)
    head = [first.next() for _ in range(9)]
    resumed = PromptOrder(7, shuffle=True, seed=3, **first.state)
    tail = [resumed.next() for _ in range(11)]
    assert head + tail == stream
    assert [pos for pos, _ in stream] == list(range(20))
