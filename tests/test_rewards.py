"""Rewards: the built-in verifiers, boxed_ and per-sample rm_type, custom rewards (sync, async, per group)
scored in worker processes or on the loop, remote_rm against a local HTTP server, bad scores and bad
config refused."""

from __future__ import annotations

import asyncio
import gc
import re
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from engine.config import load_config
from engine.errors import ConfigError
from engine.rollout.rewards import (
    INSTRUCTIONS,
    RewardError,
    RewardPool,
    dapo_reward,
    deepscaler_reward,
    f1_reward,
    gpqa_letter,
    gpqa_reward,
    ifbench_reward,
    last_boxed,
    local_reward,
    math_reward,
    resolve_reward,
)

# --- math ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, label, want",
    [
        ("85", "85", 1.0),
        ("84", "85", 0.0),
        ("the answer is 85", "85", 1.0),
        ("\\boxed{0.5}", "1/2", 1.0),
        ("so it is \\boxed{3\\sqrt{2}}", "3\\sqrt{2}", 1.0),
        ("so it is \\boxed{3}", "3\\sqrt{2}", 0.0),
        ("\\boxed{0.5}", '["2", "1/2"]', 1.0),
        ("\\boxed{7}", ["2", "1/2"], 0.0),
        ("", "85", 0.0),
        ("banana", "85", 0.0),
    ],
)
def test_math_reward(response: str, label: Any, want: float) -> None:
    assert math_reward(response, label, {}) == want


@pytest.mark.parametrize("response", ["85", "085", " 85 ", "85.0", "84", "-85", "8.5", "850", "0"])
def test_plain_number_fast_path_agrees_with_math_verify(response: str) -> None:
    from math_verify import parse, verify

    assert math_reward(response, "85", {}) == float(verify(parse("85"), parse(response)))


@pytest.mark.parametrize("name", ["math", "dapo", "deepscaler", "f1", "gpqa", "boxed_math"])
def test_a_missing_label_is_an_error(name: str) -> None:
    with pytest.raises(RewardError, match="needs a label"):
        local_reward(name)("\\boxed{1} Answer: 1", None, {})


# --- \boxed and the boxed_ prefix ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, want",
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{ {2}+{3} }", "{2}+{3}"),
        ("\\fbox{x}", "x"),
        ("$\\boxed 5$", "5"),
        ("\\boxed{1} and a broken \\boxed{2", "1"),
        ("no box", None),
        ("\\boxedfoo{3}", None),
    ],
)
def test_last_boxed(text: str, want: str | None) -> None:
    assert last_boxed(text) == want


@pytest.mark.parametrize(
    "name, response, label, want",
    [
        ("boxed_math", "work... \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("boxed_math", "the answer is 12, not \\boxed{13}", "12", 0.0),
        ("boxed_math", "the answer is 12", "12", 0.0),
        ("boxed_dapo", "\\boxed{12 cm}", "12", 1.0),
        ("boxed_dapo", "Answer: 12", "12", -1.0),
        ("boxed_f1", "blah blah \\boxed{the Eiffel Tower}", "Eiffel Tower", 1.0),
        ("boxed_f1", "Eiffel Tower", "Eiffel Tower", 0.0),
        ("boxed_gpqa", "Answer: A, I mean \\boxed{C}", "C", 1.0),
        ("boxed_deepscaler", "<think>\\boxed{2}", "2", 1.0),
    ],
)
def test_boxed_prefix(name: str, response: str, label: str, want: float) -> None:
    assert local_reward(name)(response, label, {}) == want


# --- dapo ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, label",
    [
        ("Let me think.\nAnswer: 42", "42"),
        ("answer:  $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("Answer: \\text{12 cm}", "12"),
        ("Answer: 1,000 dollars", "1000"),
        ("Answer: x = 5", "5"),
        ("Answer: 3\nAnswer: \\boxed{7}", "7"),
        ("Answer: 90^\\circ", "90"),
        ("Answer: \\frac12", "\\frac{1}{2}"),
    ],
)
def test_dapo_accepts(response: str, label: str) -> None:
    assert dapo_reward(response, label, {}) == 1.0


@pytest.mark.parametrize(
    "response, label",
    [
        ("Answer: 41", "42"),
        ("the result is 42", "42"),
        ("Answer: 42\nAnswer: 43", "42"),
        ("Answer: 42" + " padding" * 60, "42"),  # outside the last 300 characters
        ("Answer: \\frac{2}{4}", "\\frac{1}{2}"),  # a string comparison, not a mathematical one
    ],
)
def test_dapo_rejects_with_minus_one(response: str, label: str) -> None:
    assert dapo_reward(response, label, {}) == -1.0


# --- deepscaler ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, label, want",
    [
        ("<think>maybe \\boxed{3}</think> so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("<think>maybe \\boxed{1/2}</think> so \\boxed{3}", "1/2", 0.0),
        ("<think>\\boxed{1/2} and no end", "1/2", 0.0),  # <think> never closed
        ("no think at all: \\boxed{\\sqrt{4}}", "2", 1.0),
        ("</think>the answer is 2", "2", 0.0),  # no \boxed
        ("</think>\\boxed{5}", '["4", "5"]', 1.0),
        ("</think>\\boxed{5}", ["4", "6"], 0.0),
        ("</think>\\boxed{x^2+1}", "\\boxed{1 + x^2}", 1.0),
    ],
)
def test_deepscaler(response: str, label: Any, want: float) -> None:
    assert deepscaler_reward(response, label, {}) == want


# --- f1 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, label, want",
    [
        ("The Eiffel Tower!", "eiffel tower", 1.0),
        ("an apple", "apple", 1.0),
        ("paris france", "paris", 2 / 3),
        ("london", "paris", 0.0),
        ("", "paris", 0.0),
        ("the", "a", 1.0),  # both empty after normalisation
        ("Paris", '["London", "paris"]', 1.0),
        ("big red dog", ["red", "big dog"], 0.8),
    ],
)
def test_f1(response: str, label: Any, want: float) -> None:
    assert f1_reward(response, label, {}) == pytest.approx(want)


# --- gpqa ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, letter",
    [
        ("Answer: C", "C"),
        ("so the answer is (B).", "B"),
        ("The correct answer is: **D**", "D"),
        ("The answer is option J", "J"),
        ("\\boxed{E}", "E"),
        ("\\boxed{\\text{(A)}}", "A"),
        ("I first thought Answer: A\nbut no.\n(C)", "C"),
        ("Answer: A ... Actually the answer is B", "B"),
        ("long reasoning\nD.", "D"),
        ("G", "G"),
        ("the answer is a secret", None),
        ("Answer: K", None),  # letters go up to J
        ("I have no idea", None),
    ],
)
def test_gpqa_letter_patterns(response: str, letter: str | None) -> None:
    assert gpqa_letter(response) == letter


def test_gpqa_labels() -> None:
    assert gpqa_reward("Answer: C", "C", {}) == 1.0
    assert gpqa_reward("Answer: C", "(c)", {}) == 1.0
    assert gpqa_reward("Answer: B", "C", {}) == 0.0
    assert gpqa_reward("no letter", "C", {}) == 0.0
    choices = {"choices": ["4", "5", "six", "7"]}
    assert gpqa_reward("the answer is (C)", "Six", choices) == 1.0
    assert gpqa_reward("the answer is (D)", "six", choices) == 0.0
    with pytest.raises(RewardError, match="neither a letter A-J nor one of"):
        gpqa_reward("Answer: C", "eight", choices)


# --- ifbench ---------------------------------------------------------------------------------------

IFBENCH = [
    ("keywords:existence", {"keywords": ["apple", "pie"]}, "Apple PIE is great", "apple tart"),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "concatenate a dog", "the Cat sat"),
    ("keywords:frequency", {"keyword": "go", "frequency": 2, "relation": "at least"}, "go Go", "go"),
    ("keywords:frequency", {"keyword": "go", "frequency": 2, "relation": "less than"}, "go", "go go"),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
        "Zzz",
        "z",
    ),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "one two three", "one two"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "less than"}, "one two", "a b c d"),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "less than"},
        "Mr. Smith paid 3.50 dollars, e.g. for tea.",
        "One. Two! Three?",
    ),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "one\n***\ntwo", "one\n***\n***\ntwo"),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
        "First this.\n\n'Then, that.",
        "First this.\n\nAnd then that.",
    ),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [address]", "[name]"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bye", "Hi. PS bye"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\np.p.s. bye", "Hi.\nP.S. bye"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n- b\ntext", "* a\n* b\n* c"),
    ("detectable_format:constrained_response", {}, "Well. My answer is maybe.", "My answer is perhaps."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*a* and **b**", "*a* and **"),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "SECTION", "num_sections": 2},
        "SECTION 1\nx\nSECTION 2\ny",
        "SECTION 1\nx",
    ),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, 2]}\n```', "{'a': 1}"),
    ("detectable_format:title", {}, "<<My Title>>\ntext", "<< >> text"),
    ("combination:two_responses", {}, "first one\n******\nsecond one", "same\n******\nsame"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!", "Hi! Say hi."),
    ("startend:end_checker", {"end_phrase": "Any questions?"}, 'Done. any questions?"', "Any questions? No."),
    ("startend:quotation", {}, '  "quoted"  ', '"half quoted'),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "VERY LOUD words",
        "Only ONE",
    ),
    ("change_case:english_capital", {}, "ALL CAPS, 100%!", "ALL CAPS but one"),
    ("change_case:english_lowercase", {}, "all lower, 100%!", "not All lower"),
    ("punctuation:no_comma", {}, "no commas here.", "one, two"),
]


def _ifbench(iid: str, kwargs: dict) -> dict:
    return {"instruction_id_list": [iid], "kwargs": [kwargs]}


@pytest.mark.parametrize("iid, kwargs, follows, breaks", IFBENCH, ids=[c[0] for c in IFBENCH])
def test_ifbench_each_instruction(iid: str, kwargs: dict, follows: str, breaks: str) -> None:
    assert ifbench_reward(follows, None, _ifbench(iid, kwargs)) == 1.0
    assert ifbench_reward(breaks, None, _ifbench(iid, kwargs)) == 0.0


def test_ifbench_covers_every_instruction_and_scores_the_fraction_followed() -> None:
    assert {c[0] for c in IFBENCH} == set(INSTRUCTIONS)
    metadata = {
        "instruction_id_list": [
            "punctuation:no_comma",
            "change_case:english_lowercase",
            "startend:quotation",
        ],
        # null arguments are ignored, as in IFEval's released data
        "kwargs": [{"num_words": None}, {}, {}],
    }
    assert ifbench_reward("all lower, with a comma", None, metadata) == pytest.approx(1 / 3)
    assert ifbench_reward('"all lower"', None, metadata) == 1.0


@pytest.mark.parametrize(
    "metadata, message",
    [
        (
            _ifbench("language:response_language", {"language": "fr"}),
            "unknown ifbench instruction id "
            "'language:response_language' \\(known: change_case:capital_word_frequency, ",
        ),
        ({"kwargs": []}, "needs metadata\\['instruction_id_list'\\]"),
        ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]}, "a list of 1 objects"),
        (_ifbench("keywords:frequency", {"keyword": "x"}), "missing \\['frequency', 'relation'\\]"),
        (_ifbench("punctuation:no_comma", {"typo": 1}), "unknown \\['typo'\\]"),
        (_ifbench("length_constraints:number_words", {"num_words": 3, "relation": "most"}), "relation="),
        (_ifbench("length_constraints:number_words", {"num_words": "x", "relation": "at least"}), "integer"),
    ],
)
def test_ifbench_bad_metadata_is_an_error(metadata: dict, message: str) -> None:
    with pytest.raises(RewardError, match=message):
        ifbench_reward("text", None, metadata)


# --- resolution, the pool, per-sample rm_type, custom rewards ---------------------------------------


def test_resolution_errors_name_the_key() -> None:
    with pytest.raises(
        ConfigError, match=r"\[rollout\] rm_type: unknown reward 'nope' \(valid: math, dapo, "
    ):
        resolve_reward("nope", None)
    with pytest.raises(ConfigError, match="or boxed_ \\+ one of math"):
        resolve_reward("boxed_remote_rm", None)
    with pytest.raises(ConfigError, match="cannot import"):
        resolve_reward("math", "no_such_module:fn")
    with pytest.raises(ConfigError, match="has no attribute"):
        resolve_reward("math", "tests.rewards_custom:absent")
    assert resolve_reward("math", "tests.rewards_custom.length_reward")("abc", None, {}) == 3.0
    with pytest.raises(ConfigError, match=r"\[rollout\] rm_url: rm_type = 'remote_rm' needs rm_url"):
        RewardPool("remote_rm", None)
    with pytest.raises(ConfigError, match=r"\[rollout\] group_rm: a group reward needs custom_rm_path"):
        RewardPool("math", None, group_rm=True)


def test_pool_scores_in_worker_processes() -> None:
    async def go(pool: RewardPool) -> list[list[float]]:
        return await asyncio.gather(pool.score(["12", "13", "x"], "12", {}), pool.score(["1"], "1", {}))

    pool = RewardPool("math", None, workers=2)
    try:
        assert asyncio.run(go(pool)) == [[1.0, 0.0, 0.0], [1.0]]
    finally:
        pool.close()
    custom = RewardPool("math", "tests.rewards_custom:length_reward", workers=1)
    try:
        assert asyncio.run(custom.score(["abcd", ""], None, {"bonus": 0.5})) == [4.5, 0.5]
    finally:
        custom.close()


def test_metadata_rm_type_overrides_per_sample() -> None:
    ifbench = _ifbench("punctuation:no_comma", {})

    async def go(pool: RewardPool) -> list[list[float]]:
        return await asyncio.gather(
            pool.score(["12", "13"], "12", {}),
            pool.score(["the Paris", "Rome"], "paris", {"rm_type": "f1"}),
            pool.score(["Answer: 7", "7"], "7", {"rm_type": "dapo"}),
            pool.score(["\\boxed{1/2}", "1/2"], "0.5", {"rm_type": "boxed_math"}),
            pool.score(["no comma", "a, b"], None, {"rm_type": "ifbench", **ifbench}),
        )

    pool = RewardPool("math", None, workers=1)
    try:
        assert asyncio.run(go(pool)) == [[1.0, 0.0], [1.0, 0.0], [1.0, -1.0], [1.0, 0.0], [1.0, 0.0]]
        with pytest.raises(RewardError, match="metadata\\['rm_type'\\]: unknown reward 'mathh'"):
            asyncio.run(pool.score(["1"], "1", {"rm_type": "mathh"}))
        with pytest.raises(RewardError, match=r"'remote_rm' needs rollout\.rm_url"):
            asyncio.run(pool.score(["1"], "1", {"rm_type": "remote_rm"}))
        with pytest.raises(RewardError, match="unknown ifbench instruction id 'nope:x'"):
            asyncio.run(pool.score(["1"], None, {"rm_type": "ifbench", **_ifbench("nope:x", {})}))
    finally:
        pool.close()


@pytest.mark.parametrize(
    "path, group, want",
    [
        ("tests.rewards_custom:group_rank_reward", True, [0.0, 1.0, 1.0]),
        ("tests.rewards_custom:async_length_reward", False, [1.5, 3.5, 3.5]),
        ("tests.rewards_custom:async_group_rank_reward", True, [0.0, 1.0, 1.0]),
    ],
)
def test_group_and_async_custom_rewards(path: str, group: bool, want: list[float]) -> None:
    pool = RewardPool("math", path, workers=1, group_rm=group)
    try:
        assert asyncio.run(pool.score(["a", "abc", "xyz"], None, {"bonus": 0.5, "rm_type": "nope"})) == want
    finally:
        pool.close()


@pytest.mark.parametrize(
    "path, group, message",
    [
        ("tests.rewards_custom:nan_reward", False, "nan_reward' returned nan for response 'resp'"),
        ("tests.rewards_custom:failing_reward", False, "boom"),
        ("tests.rewards_custom:short_group_reward", True, "returned \\[\\] for 1 responses"),
        ("tests.rewards_custom:async_failing_reward", False, "async_failing_reward' failed .*async boom"),
        ("tests.rewards_custom:length_reward", True, "returned 1.0 for 1 responses; expected a list"),
    ],
)
def test_bad_scores_are_errors(path: str, group: bool, message: str) -> None:
    pool = RewardPool("math", path, workers=1, group_rm=group)
    try:
        with pytest.raises(RewardError, match=message):
            asyncio.run(pool.score(["resp"], None, {}))
    finally:
        pool.close()


# --- remote_rm -------------------------------------------------------------------------------------

Handler = Callable[[int, dict], Awaitable[web.StreamResponse]]


class RewardServer:
    """A reward server on 127.0.0.1 (port 0) that records every request and answers with `handler`."""

    def __init__(self, handler: Handler) -> None:
        self.handler, self.requests, self.in_flight, self.max_in_flight = handler, [], 0, 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.handler(len(self.requests), self.requests[-1])
        finally:
            self.in_flight -= 1

    async def __aenter__(self) -> RewardServer:
        app = web.Application()
        app.router.add_post("/reward", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/reward"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


def remote(url: str, **kwargs: Any) -> RewardPool:
    return RewardPool("remote_rm", None, workers=1, rm_url=url, **{"rm_timeout": 0.2, **kwargs})


def test_remote_rm_scores_a_group_concurrently() -> None:
    async def scenario() -> tuple[list[float], RewardServer]:
        all_in = asyncio.Event()

        async def handler(n: int, body: dict) -> web.StreamResponse:
            if n == 3:
                all_in.set()
            await asyncio.wait_for(all_in.wait(), 5)  # the three requests are in flight together
            score = len(body["response"])
            return web.json_response({"reward": score} if score % 2 else score)

        async with RewardServer(handler) as server:
            pool = remote(server.url, rm_timeout=10)
            try:
                got = await pool.score(["a", "bb", "ccc"], "L", {"k": 1}, prompt="P")
            finally:
                pool.close()
        return got, server

    got, server = asyncio.run(scenario())
    assert got == [1.0, 2.0, 3.0]
    assert sorted(server.requests, key=lambda b: b["response"]) == [
        {"prompt": "P", "response": r, "label": "L", "metadata": {"k": 1}} for r in ["a", "bb", "ccc"]
    ]


def test_remote_rm_concurrency_is_bounded() -> None:
    async def handler(n: int, body: dict) -> web.StreamResponse:
        await asyncio.sleep(0)
        return web.json_response(1)

    async def scenario() -> int:
        async with RewardServer(handler) as server:
            pool = remote(server.url, rm_timeout=10, rm_concurrency=2)
            try:
                assert await pool.score(["x"] * 6, None, {}) == [1.0] * 6
            finally:
                pool.close()
        return server.max_in_flight

    assert asyncio.run(scenario()) <= 2


def test_remote_rm_retries_a_timeout() -> None:
    async def scenario() -> tuple[list[float], int]:
        release = asyncio.Event()

        async def handler(n: int, body: dict) -> web.StreamResponse:
            if n == 1:  # longer than rm_timeout: the client gives up and asks again
                await asyncio.wait_for(release.wait(), 5)
            return web.json_response(0.5)

        async with RewardServer(handler) as server:
            pool = remote(server.url, rm_max_retries=1)
            try:
                got = await pool.score(["r"], None, {})
            finally:
                release.set()
                pool.close()
        return got, len(server.requests)

    assert asyncio.run(scenario()) == ([0.5], 2)


@pytest.mark.parametrize(
    "status, retries, attempts, message",
    [
        (
            500,
            2,
            3,
            "failed after 3 attempts \\(rollout.rm_max_retries = 2\\); last: HTTP 500 \\('overloaded'",
        ),
        (503, 0, 1, "failed after 1 attempts .*HTTP 503"),
        (400, 3, 1, "answered HTTP 400 \\('overloaded'\\); a client error is not retried"),
    ],
)
def test_remote_rm_server_errors(status: int, retries: int, attempts: int, message: str) -> None:
    async def handler(n: int, body: dict) -> web.StreamResponse:
        return web.Response(status=status, text="overloaded")

    async def scenario() -> tuple[str, str, int]:
        async with RewardServer(handler) as server:
            pool = remote(server.url, rm_max_retries=retries)
            try:
                with pytest.raises(RewardError) as err:
                    await pool.score(["r"], None, {})
            finally:
                pool.close()
        return str(err.value), server.url, len(server.requests)

    text, url, requests = asyncio.run(scenario())
    assert requests == attempts
    assert url in text
    assert re.search(message, text), text


@pytest.mark.parametrize("answer", ['"high"', '{"score": 1}', "true", "NaN"])
def test_remote_rm_malformed_answers_are_errors(answer: str) -> None:
    async def handler(n: int, body: dict) -> web.StreamResponse:
        return web.Response(text=answer, content_type="application/json")

    async def scenario() -> int:
        async with RewardServer(handler) as server:
            pool = remote(server.url)
            try:
                with pytest.raises(RewardError, match="expected a"):
                    await pool.score(["r"], None, {})
            finally:
                pool.close()
        return len(server.requests)

    assert asyncio.run(scenario()) == 1


def test_remote_rm_connection_refused_is_retried_then_an_error() -> None:
    async def handler(n: int, body: dict) -> web.StreamResponse:
        return web.json_response(1)

    async def scenario() -> None:
        async with RewardServer(handler) as server:
            url = server.url
        pool = remote(url, rm_max_retries=1)  # the server is gone: nothing listens there any more
        try:
            with pytest.raises(RewardError, match=f"{url} failed after 2 attempts .*connection error"):
                await pool.score(["r"], None, {})
        finally:
            pool.close()

    asyncio.run(scenario())


def test_remote_rm_pool_closes_from_another_thread_and_after_its_loop() -> None:
    """As in the producer actor: the loop runs in its own thread, close() comes from outside it."""

    async def handler(n: int, body: dict) -> web.StreamResponse:
        return web.json_response(1)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        server = asyncio.run_coroutine_threadsafe(RewardServer(handler).__aenter__(), loop).result()
        pool = remote(server.url)
        assert asyncio.run_coroutine_threadsafe(pool.score(["r"], None, {}), loop).result() == [1.0]
        pool.close()
        pool.close()  # twice is fine
        asyncio.run_coroutine_threadsafe(server.__aexit__(), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    async def scenario() -> RewardPool:
        async with RewardServer(handler) as server:
            pool = remote(server.url)
            assert await pool.score(["r"], None, {}) == [1.0]
        return pool

    pool = asyncio.run(scenario())  # its loop is gone, the session still open when asyncio.run ended
    pool.close()
    gc.collect()  # no unclosed session, connector or transport is left to warn


# --- config ----------------------------------------------------------------------------------------

BASE = """\
[ckpt]
hf_checkpoint = "some/model"

[rollout]
prompt_data = "p.jsonl"
batch_size = 4
num_rollout = 3
"""


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            'rm_type = "mth"',
            "rm_type: unknown reward 'mth' \\(valid: math, dapo, deepscaler, f1, gpqa, "
            "ifbench, remote_rm, or boxed_ \\+ one of",
        ),
        ('rm_type = "remote_rm"', "rm_url: rm_type = 'remote_rm' needs rm_url"),
        ('rm_type = "remote_rm"\nrm_url = "ftp://host/x"', "rm_url: must be an http:// or https:// URL"),
        ('rm_url = "http://"', "rm_url: must be an http:// or https:// URL with a host"),
        ("rm_timeout = 0", "rm_timeout: must be > 0"),
        ("rm_max_retries = -1", "rm_max_retries: must be >= 0"),
        ("rm_concurrency = 0", "rm_concurrency: must be > 0"),
        ("group_rm = true", "group_rm: scores a group with a custom function"),
    ],
)
def test_reward_config_errors(tmp_path: Path, lines: str, message: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(BASE + lines + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_reward_config_accepts(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(BASE + 'rm_type = "remote_rm"\nrm_url = "https://rm.local:8000/score"\nrm_timeout = 2\n')
    config = load_config(path)
    assert (config.rollout.rm_url, config.rollout.rm_timeout, config.rollout.rm_max_retries) == (
        "https://rm.local:8000/score",
        2.0,
        3,
    )
    path.write_text(BASE + 'rm_type = "boxed_gpqa"\n')
    assert load_config(path).rollout.rm_type == "boxed_gpqa"
