"""Evaluation metrics of one eval set: mean reward, accuracy and the unbiased pass@k estimator.

A sample counts as correct when its reward is > 0 (the same rule as `rollout/accuracy`). With n samples
per prompt, c of them correct, pass@k is the probability that at least one of k samples drawn without
replacement from the n is correct, 1 - C(n - c, k) / C(n, k), averaged over prompts (Chen et al. 2021,
"Evaluating Large Language Models Trained on Code"). It is unbiased for the pass rate of k fresh samples,
non-decreasing in k, and pass@1 equals the accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k) for one prompt with c correct samples out of n, 1 <= k <= n.

    Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i), a product of c factors in [0, 1): no large
    binomial coefficients, no cancellation between huge numbers, exact 1.0 when n - c < k.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(correct: Sequence[int], n: int) -> dict[int, float]:
    """{k: pass@k averaged over prompts} for k = 1..n; correct[p] = correct samples of prompt p."""
    if not correct:
        raise ValueError("pass@k of an empty eval set")
    return {k: sum(pass_at_k(n, c, k) for c in correct) / len(correct) for k in range(1, n + 1)}


def eval_set_metrics(name: str, rewards: Sequence[Sequence[float]]) -> dict[str, float]:
    """`eval/<name>/{reward, accuracy, pass@1 .. pass@n}` from rewards[p][i], n samples per prompt."""
    n = len(rewards[0]) if rewards else 0
    if n == 0 or any(len(r) != n for r in rewards):
        raise ValueError(f"eval set {name!r}: every prompt needs the same number (>= 1) of samples")
    flat = [x for r in rewards for x in r]
    correct = [sum(x > 0 for x in r) for r in rewards]
    out = {
        f"eval/{name}/reward": sum(flat) / len(flat),
        f"eval/{name}/accuracy": sum(correct) / len(flat),
    }
    out.update({f"eval/{name}/pass@{k}": v for k, v in mean_pass_at_k(correct, n).items()})
    return out
