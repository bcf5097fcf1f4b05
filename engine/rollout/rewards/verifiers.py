"""Built-in verifiers by name (math, dapo, deepscaler, f1, gpqa, ifbench) and the `boxed_` prefix.

Each is `fn(response, label, metadata) -> float`, pure and synchronous: the reward pool runs them in its
worker processes. Guarantee: a verifier returns one of its documented values (math, deepscaler, gpqa: 1.0
or 0.0; dapo: 1.0 or -1.0; f1, ifbench: a value in [0, 1]; a `boxed_` reward with no \\boxed in the
response: the named reward's failure value) or raises RewardError when the label or metadata cannot be
graded (no label, a gpqa label naming no choice, malformed ifbench metadata). docs/rewards.md has the
details of each.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from decimal import Decimal
from typing import Any, NamedTuple

from engine.rollout.rewards.base import RewardError, RewardFn, labels_of
from engine.rollout.rewards.ifbench import ifbench_reward

REMOTE = "remote_rm"
BOXED = "boxed_"


# --- \boxed{...} ------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """The content of the last well-formed \\boxed{...} (or \\fbox{...}, or `\\boxed 5`) in text, nested
    braces included; None when there is none."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text)]
    for start in reversed(starts):
        i = start
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
        elif i > start:  # "\boxed 5": up to the next space or $
            m = re.match(r"[^\s$]+", text[i:])
            if m:
                return m.group(0)
    return None


# --- math (math-verify) -------------------------------------------------------------------------------

_PLAIN_NUMBER = re.compile(r"\s*-?\d+(?:\.\d+)?\s*")


@functools.lru_cache(maxsize=65536)
def _parse_label(label: str) -> list:
    from math_verify import parse

    # A bare label ("3\sqrt{2}", "x = 5") is read as the content of a \boxed{}; one with its own
    # \boxed or $...$ as it is.
    return parse(label if ("\\boxed" in label or "$" in label) else f"\\boxed{{{label}}}")


def _verify_any(labels: list[str], pred_text: str, boxed: bool) -> float:
    """1.0 when pred_text (a whole response, or an extracted answer when `boxed`) equals any label."""
    from math_verify import parse, verify

    pred: list | None = None
    for gold in labels:
        if _PLAIN_NUMBER.fullmatch(gold) and _PLAIN_NUMBER.fullmatch(pred_text):
            if Decimal(gold.strip()) == Decimal(pred_text.strip()):
                return 1.0
            continue
        gold_parsed = _parse_label(gold)
        if pred is None:
            pred = parse(f"\\boxed{{{pred_text}}}" if boxed else pred_text)
        if gold_parsed and pred and verify(gold_parsed, pred):
            return 1.0
    return 0.0


def math_reward(response: str, label: Any, metadata: dict) -> float:
    """1.0 when math-verify finds the response's final answer equal to the label (or one of the labels),
    else 0.0. Plain decimal numbers on both sides are compared as numbers directly (math-verify's answer
    for them, without its parser's cost)."""
    return _verify_any(labels_of(label, "math"), response, boxed=False)


def grade_math(answer: str, label: Any, metadata: dict) -> float:
    return _verify_any(labels_of(label, "math"), answer, boxed=True)


# --- dapo ----------------------------------------------------------------------------------------------

_DAPO_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_SUBSTITUTIONS = [
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
]  # fmt: skip
_REMOVED = [
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
    "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
    ",\\!", "{,}", '"', "\\dots",
]  # fmt: skip


def dapo_normalize(answer: str) -> str:
    """DAPO's (Minerva's) normalisation of a final answer: the part after the last '=', no spaces, $
    signs, \\text{...} wrappers, units or trailing period; shorthand \\frac12 and \\sqrt2 expanded;
    thousands separators dropped."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in _REMOVED:
        answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip().rstrip(".").strip()


def dapo_reward(response: str, label: Any, metadata: dict) -> float:
    """1.0 when the answer after the last 'Answer:' in the response's last 300 characters equals the
    label after dapo_normalize on both, else -1.0."""
    matches = _DAPO_ANSWER.findall(response[-300:])
    if not matches:
        labels_of(label, "dapo")
        return -1.0
    return grade_dapo(matches[-1], label, metadata)


def grade_dapo(answer: str, label: Any, metadata: dict) -> float:
    pred = dapo_normalize(answer)
    return 1.0 if any(pred == dapo_normalize(g) for g in labels_of(label, "dapo")) else -1.0


# --- deepscaler ----------------------------------------------------------------------------------------


def deepscaler_reward(response: str, label: Any, metadata: dict) -> float:
    """DeepScaleR's reward: the last \\boxed answer after </think> (the whole response when there is no
    <think>; 0.0 when <think> is never closed), graded by math-verify against the label(s)."""
    labels = labels_of(label, "deepscaler")
    if "</think>" in response:
        response = response.rpartition("</think>")[2]
    elif "<think>" in response:
        return 0.0
    answer = last_boxed(response)
    return 0.0 if answer is None else grade_deepscaler(answer, labels, metadata)


def grade_deepscaler(answer: str, label: Any, metadata: dict) -> float:
    labels = [last_boxed(g) or g if "\\boxed" in g else g for g in labels_of(label, "deepscaler")]
    return _verify_any(labels, answer, boxed=True)


# --- f1 ------------------------------------------------------------------------------------------------

_PUNCTUATION = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _f1(pred: str, gold: str) -> float:
    p, g = squad_normalize(pred).split(), squad_normalize(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_reward(response: str, label: Any, metadata: dict) -> float:
    """Token-level F1 between response and label after squad_normalize; the best over several labels."""
    return max(_f1(response, g) for g in labels_of(label, "f1"))


# --- gpqa ----------------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"
_GPQA_PATTERNS = [
    re.compile(r"(?i:answer)(?:\s+is)?[\s:*=]*(?:(?i:option|choice)\s+)?[(\[]?([A-J])[)\]]?(?![A-Za-z0-9])"),
    re.compile(r"\\boxed\{\s*(?:\\text(?:bf)?\{\s*)?\(?([A-J])\)?\s*\}?\s*\}"),
]
_LONE = re.compile(r"[(\[]?([A-J])[)\]]?[.:]?")


def gpqa_letter(response: str) -> str | None:
    """The last answer letter (A-J) in the response: 'Answer: C', 'the answer is (C)', '\\boxed{C}', or a
    final line that is only '(C)', 'C.' or 'C'."""
    found = [(m.end(), m.group(1)) for p in _GPQA_PATTERNS for m in p.finditer(response)]
    lines = [line.strip().strip("*").strip() for line in response.strip().splitlines()]
    if lines and (m := _LONE.fullmatch(lines[-1])):
        found.append((len(response) + 1, m.group(1)))
    return max(found)[1] if found else None


def _gpqa_gold(label: str, metadata: dict) -> str:
    m = re.fullmatch(r"\s*[(\[]?([A-Ja-j])[)\]]?\.?\s*", label)
    if m:
        return m.group(1).upper()
    choices = metadata.get("choices")
    if isinstance(choices, list):
        wanted = " ".join(label.split()).casefold()
        for i, choice in enumerate(choices[: len(LETTERS)]):
            if " ".join(str(choice).split()).casefold() == wanted:
                return LETTERS[i]
    raise RewardError(
        f"gpqa label {label[:80]!r} is neither a letter A-J nor one of metadata['choices'] ({choices!r:.200})"
    )


def gpqa_reward(response: str, label: Any, metadata: dict) -> float:
    """1.0 when the response's answer letter is the label's letter (a label may also be the text of one
    of metadata['choices']), else 0.0."""
    golds = {_gpqa_gold(g, metadata) for g in labels_of(label, "gpqa")}
    return 1.0 if gpqa_letter(response) in golds else 0.0


# --- names and the boxed_ prefix -----------------------------------------------------------------------


class Verifier(NamedTuple):
    reward: RewardFn  # on a whole response
    grade: RewardFn  # on an extracted \boxed answer (the boxed_ prefix)
    failure: float  # the score when there is no answer at all


VERIFIERS: dict[str, Verifier] = {
    "math": Verifier(math_reward, grade_math, 0.0),
    "dapo": Verifier(dapo_reward, grade_dapo, -1.0),
    "deepscaler": Verifier(deepscaler_reward, grade_deepscaler, 0.0),
    "f1": Verifier(f1_reward, f1_reward, 0.0),
    "gpqa": Verifier(gpqa_reward, gpqa_reward, 0.0),
    "ifbench": Verifier(ifbench_reward, ifbench_reward, 0.0),
}
BUILTIN: dict[str, RewardFn] = {name: v.reward for name, v in VERIFIERS.items()}


def boxed_reward(base: str, response: str, label: Any, metadata: dict) -> float:
    """The `base` reward on the content of the response's last \\boxed{...}; its failure value without one."""
    verifier = VERIFIERS[base]
    answer = last_boxed(response)
    return verifier.failure if answer is None else verifier.grade(answer, label, metadata)


def base_name(name: str) -> str:
    return name.removeprefix(BOXED) if name.startswith(BOXED) else name


def reward_names() -> list[str]:
    """Every valid rm_type: the verifiers, remote_rm, and boxed_<verifier>."""
    return [*VERIFIERS, REMOTE, *(BOXED + n for n in VERIFIERS)]


def name_problem(name: Any) -> str | None:
    """Why `name` is not a valid rm_type, or None when it is."""
    if isinstance(name, str) and (name in VERIFIERS or name == REMOTE or base_name(name) in VERIFIERS):
        return None
    return (
        f"unknown reward {name!r} (valid: {', '.join([*VERIFIERS, REMOTE])}, or boxed_ + one of "
        f"{', '.join(VERIFIERS)}, e.g. boxed_math)"
    )


def local_reward(name: str) -> RewardFn:
    """The synchronous verifier for a valid non-remote name."""
    if name in VERIFIERS:
        return VERIFIERS[name].reward
    return functools.partial(boxed_reward, base_name(name))
