"""Rewards: built-in verifiers by name, an HTTP reward server, or a user function by import path.

`RewardPool.score(responses, label, metadata)` is the one entry point the producer awaits; docs/rewards.md
describes every reward. Guarantee: every score that comes back is a finite float; anything else raises
RewardError naming the reward and the response.
"""

from engine.rollout.rewards.base import RewardError, RewardFn, checked, labels_of
from engine.rollout.rewards.ifbench import INSTRUCTIONS, ifbench_reward, parse_metadata
from engine.rollout.rewards.pool import RewardPool, load_object, resolve_reward
from engine.rollout.rewards.remote import RemoteReward
from engine.rollout.rewards.verifiers import (
    BUILTIN,
    REMOTE,
    VERIFIERS,
    dapo_normalize,
    dapo_reward,
    deepscaler_reward,
    f1_reward,
    gpqa_letter,
    gpqa_reward,
    last_boxed,
    local_reward,
    math_reward,
    name_problem,
    reward_names,
    squad_normalize,
)

__all__ = [
    "BUILTIN",
    "INSTRUCTIONS",
    "REMOTE",
    "VERIFIERS",
    "RemoteReward",
    "RewardError",
    "RewardFn",
    "RewardPool",
    "checked",
    "dapo_normalize",
    "dapo_reward",
    "deepscaler_reward",
    "f1_reward",
    "gpqa_letter",
    "gpqa_reward",
    "ifbench_reward",
    "labels_of",
    "last_boxed",
    "load_object",
    "local_reward",
    "math_reward",
    "name_problem",
    "parse_metadata",
    "resolve_reward",
    "reward_names",
    "squad_normalize",
]
