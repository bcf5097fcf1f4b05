"""The `ifbench` reward: verifiable instruction following, checked the IFEval way.

A sample's metadata names its instructions and their arguments:
`{"instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
  "kwargs": [{}, {"num_words": 100, "relation": "at least"}]}`
(kwargs whose value is null are ignored, as in IFEval's released data). Relations are "less than" and
"at least". Guarantee: `ifbench_reward` returns the fraction of the listed instructions that the response
follows, a value in [0, 1]; malformed metadata (an unknown instruction id, a missing, unknown or
ill-typed argument, lists of different lengths) raises RewardError naming the problem, never a score.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.rollout.rewards.base import RewardError

RELATIONS = ("less than", "at least")


@dataclass(frozen=True)
class Instruction:
    check: Callable[..., bool]
    kwargs: dict[str, Callable[[Any], Any]]  # argument name -> converter (raises on a bad value)


INSTRUCTIONS: dict[str, Instruction] = {}


def _relation(value: Any) -> str:
    if value not in RELATIONS:
        raise ValueError(f"must be one of {RELATIONS}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _texts(value: Any) -> list[str]:
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError("must be a list of strings")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value < 0:
        raise ValueError("must be a non-negative integer")
    return int(value)


def _letter(value: Any) -> str:
    if not (isinstance(value, str) and len(value) == 1 and value.isalpha()):
        raise ValueError("must be a single letter")
    return value.lower()


def _instruction(name: str, **kwargs: Callable[[Any], Any]) -> Callable[[Callable[..., bool]], Callable]:
    def register(fn: Callable[..., bool]) -> Callable[..., bool]:
        INSTRUCTIONS[name] = Instruction(fn, kwargs)
        return fn

    return register


def _compare(count: int, relation: str, n: int) -> bool:
    return count < n if relation == "less than" else count >= n


# --- keywords ------------------------------------------------------------------------------------------


@_instruction("keywords:existence", keywords=_texts)
def _existence(text: str, keywords: list[str]) -> bool:
    return all(re.search(re.escape(k), text, re.I) for k in keywords)


@_instruction("keywords:forbidden_words", forbidden_words=_texts)
def _forbidden(text: str, forbidden_words: list[str]) -> bool:
    return not any(re.search(rf"\b{re.escape(w)}\b", text, re.I) for w in forbidden_words)


@_instruction("keywords:frequency", keyword=_text, frequency=_count, relation=_relation)
def _frequency(text: str, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(re.findall(re.escape(keyword), text, re.I)), relation, frequency)


@_instruction("keywords:letter_frequency", letter=_letter, let_frequency=_count, let_relation=_relation)
def _letter_frequency(text: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(text.lower().count(letter), let_relation, let_frequency)


# --- length --------------------------------------------------------------------------------------------

_ABBREVIATIONS = re.compile(r"\b(Mr|Mrs|Ms|Dr|St|Prof|Sr|Jr|vs|e\.g|i\.e|Inc|Ltd)\.", re.I)


def count_sentences(text: str) -> int:
    """Sentences end at . ! or ? followed by a space or the end (abbreviations such as Mr. and e.g., and
    decimals, excepted)."""
    text = _ABBREVIATIONS.sub(lambda m: m.group(1).replace(".", "") + "_", text)
    text = re.sub(r"(\d)\.(\d)", r"\1_\2", text)
    parts = re.split(r"[.!?]+[\"')\]]*(?:\s+|$)", text)
    return sum(1 for p in parts if re.search(r"\w", p))


@_instruction("length_constraints:number_words", num_words=_count, relation=_relation)
def _number_words(text: str, num_words: int, relation: str) -> bool:
    return _compare(len(re.findall(r"\w+", text)), relation, num_words)


@_instruction("length_constraints:number_sentences", num_sentences=_count, relation=_relation)
def _number_sentences(text: str, num_sentences: int, relation: str) -> bool:
    return _compare(count_sentences(text), relation, num_sentences)


@_instruction("length_constraints:number_paragraphs", num_paragraphs=_count)
def _number_paragraphs(text: str, num_paragraphs: int) -> bool:
    """Paragraphs are separated by the markdown divider ***; an empty one inside the text fails."""
    paragraphs = re.split(r"\s?\*\*\*\s?", text)
    count = len(paragraphs)
    for i, p in enumerate(paragraphs):
        if not p.strip():
            if 0 < i < len(paragraphs) - 1:
                return False
            count -= 1
    return count == num_paragraphs


@_instruction(
    "length_constraints:nth_paragraph_first_word",
    num_paragraphs=_count,
    nth_paragraph=_count,
    first_word=_text,
)
def _nth_paragraph(text: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Paragraphs are separated by blank lines."""
    paragraphs = [p.strip() for p in re.split(r"\n\n", text) if p.strip()]
    if len(paragraphs) != num_paragraphs or not 1 <= nth_paragraph <= len(paragraphs):
        return False
    word = paragraphs[nth_paragraph - 1].split()[0].lstrip("'\"")
    word = re.split(r"[.,?!'\"]", word)[0].lower()
    return word == first_word.strip().lower()


# --- content and format --------------------------------------------------------------------------------


@_instruction("detectable_content:number_placeholders", num_placeholders=_count)
def _placeholders(text: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", text)) >= num_placeholders


@_instruction("detectable_content:postscript", postscript_marker=_text)
def _postscript(text: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, text.lower(), flags=re.M))


@_instruction("detectable_format:number_bullet_lists", num_bullets=_count)
def _bullets(text: str, num_bullets: int) -> bool:
    """Markdown bullets: lines starting with '* ' or '- '."""
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.M)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.M)
    return len(stars) + len(dashes) == num_bullets


@_instruction("detectable_format:constrained_response")
def _constrained(text: str) -> bool:
    return any(o in text for o in ("My answer is yes.", "My answer is no.", "My answer is maybe."))


@_instruction("detectable_format:number_highlighted_sections", num_highlights=_count)
def _highlights(text: str, num_highlights: int) -> bool:
    """Markdown highlights: *text* or **text** on one line."""
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


@_instruction("detectable_format:multiple_sections", section_spliter=_text, num_sections=_count)
def _sections(text: str, section_spliter: str, num_sections: int) -> bool:
    """Sections start with '<section_spliter> <number>', e.g. 'SECTION 1'."""
    sections = re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", text)
    return len(sections) - 1 >= num_sections


@_instruction("detectable_format:json_format")
def _json(text: str) -> bool:
    """The whole response parses as JSON (a surrounding ```json fence is allowed)."""
    value = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        value = value.removeprefix(fence)
    value = value.removesuffix("```").strip()
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


@_instruction("detectable_format:title")
def _title(text: str) -> bool:
    """A title in double angular brackets, <<like this>>."""
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))


@_instruction("combination:two_responses")
def _two_responses(text: str) -> bool:
    """Two different responses separated by ******."""
    parts = text.split("******")
    valid = []
    for i, part in enumerate(parts):
        if part.strip():
            valid.append(part.strip())
        elif 0 < i < len(parts) - 1:
            return False
    return len(valid) == 2 and valid[0] != valid[1]


@_instruction("combination:repeat_prompt", prompt_to_repeat=_text)
def _repeat_prompt(text: str, prompt_to_repeat: str) -> bool:
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


@_instruction("startend:end_checker", end_phrase=_text)
def _end_checker(text: str, end_phrase: str) -> bool:
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@_instruction("startend:quotation")
def _quotation(text: str) -> bool:
    text = text.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


# --- case and punctuation (no language detection: any cased text counts) -------------------------------


@_instruction("change_case:capital_word_frequency", capital_frequency=_count, capital_relation=_relation)
def _capital_words(text: str, capital_frequency: int, capital_relation: str) -> bool:
    words = re.findall(r"\b\w+\b", text)
    return _compare(sum(1 for w in words if w.isupper()), capital_relation, capital_frequency)


@_instruction("change_case:english_capital")
def _all_capital(text: str) -> bool:
    return text.isupper()


@_instruction("change_case:english_lowercase")
def _all_lowercase(text: str) -> bool:
    return text.islower()


@_instruction("punctuation:no_comma")
def _no_comma(text: str) -> bool:
    return "," not in text


# --- metadata and the reward ---------------------------------------------------------------------------

Parsed = list[tuple[Instruction, dict[str, Any]]]


def parse_metadata(metadata: dict) -> Parsed:
    """The instructions of a sample with their converted arguments; RewardError on anything malformed."""
    ids = metadata.get("instruction_id_list")
    if not (isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids)):
        raise RewardError(
            "the ifbench reward needs metadata['instruction_id_list'], a non-empty list of instruction "
            f"ids; got {ids!r:.200}"
        )
    all_kwargs = metadata.get("kwargs")
    if all_kwargs is None:
        all_kwargs = [{} for _ in ids]
    if not (isinstance(all_kwargs, list) and len(all_kwargs) == len(ids)):
        raise RewardError(
            f"ifbench metadata['kwargs'] must be a list of {len(ids)} objects, one per instruction id; "
            f"got {all_kwargs!r:.200}"
        )
    parsed: Parsed = []
    for iid, kwargs in zip(ids, all_kwargs, strict=True):
        if iid not in INSTRUCTIONS:
            raise RewardError(
                f"unknown ifbench instruction id {iid!r} (known: {', '.join(sorted(INSTRUCTIONS))})"
            )
        inst = INSTRUCTIONS[iid]
        if not isinstance(kwargs or {}, dict):
            raise RewardError(f"ifbench instruction {iid!r}: kwargs must be an object, got {kwargs!r:.200}")
        given = {k: v for k, v in (kwargs or {}).items() if v is not None}
        unknown = sorted(set(given) - set(inst.kwargs))
        missing = sorted(set(inst.kwargs) - set(given))
        if unknown or missing:
            raise RewardError(
                f"ifbench instruction {iid!r} takes arguments {sorted(inst.kwargs)}; "
                f"missing {missing}, unknown {unknown}"
            )
        converted = {}
        for key, convert in inst.kwargs.items():
            try:
                converted[key] = convert(given[key])
            except ValueError as e:
                raise RewardError(f"ifbench instruction {iid!r}: {key}={given[key]!r} {e}") from None
        parsed.append((inst, converted))
    return parsed


def ifbench_reward(response: str, label: Any, metadata: dict) -> float:
    """The fraction of metadata's instructions that the response follows (the label is not used)."""
    parsed = parse_metadata(metadata)
    return sum(1.0 for inst, kwargs in parsed if inst.check(response, **kwargs)) / len(parsed)
