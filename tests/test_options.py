"""The whole algorithm, optimizer, evaluation and reward option set: a config that sets every key runs a
step end to end (ppo with its critic, rewards from a real local HTTP reward server), and a wrong value for
any key is an error that names it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import tomllib
import typing
from pathlib import Path

import pytest

from engine.config import load_config
from engine.errors import ConfigError
from engine.learner.config import AlgoConfig, OptimizerConfig
from engine.rollout.config import EvalConfig, RolloutConfig

ROOT = Path(__file__).resolve().parents[1]
EVERY = ROOT / "tests" / "data" / "every_option.toml"
REWARD_KEYS = ("rm_type", "rm_url", "rm_timeout", "rm_max_retries", "rm_concurrency", "group_rm")
# Keys that exclude a value set in every_option.toml; the second variant of the run sets them.
EXCLUSIVE = {"algo": {"custom_loss_function_path"}}
VARIANTS = {
    "ppo-kl-shaping": [],
    "grpo-kl-loss-custom-loss-sgd": [
        "algo.advantage_estimator=grpo",
        "algo.kl_coef=0.0",
        "algo.use_kl_loss=true",
        "algo.kl_loss_coef=0.01",
        "algo.loss_type=custom_loss",
        "algo.custom_loss_function_path=tests.losses_custom:reinforce",
        "algo.use_tis=false",
        "algo.use_rollout_logprobs=true",
        "optimizer.optimizer=sgd",
        "optimizer.sgd_momentum=0.9",
        "optimizer.lr_decay_style=linear",
    ],
}


def test_every_option_is_set_in_the_fixture() -> None:
    data = tomllib.loads(EVERY.read_text())
    for cls in (AlgoConfig, OptimizerConfig, EvalConfig):
        missing = (
            set(cls.__struct_fields__) - set(data[cls.section_name]) - EXCLUSIVE.get(cls.section_name, set())
        )
        assert not missing, (cls.section_name, missing)
    assert set(REWARD_KEYS) <= set(data["rollout"])
    variant_keys = {item.split("=")[0] for items in VARIANTS.values() for item in items}
    assert {f"algo.{k}" for k in EXCLUSIVE["algo"]} <= variant_keys


class RewardServer:
    """A real HTTP reward server on loopback (aiohttp), speaking remote_rm's contract: the response is
    correct when it equals the label."""

    def __init__(self) -> None:
        self.requests = 0
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        assert self.ready.wait(30)

    def _serve(self) -> None:
        import asyncio

        from aiohttp import web

        async def score(request: web.Request) -> web.Response:
            body = await request.json()
            self.requests += 1
            correct = body["response"].strip() == str(body["label"]).strip()
            return web.json_response({"reward": 1.0 if correct else 0.0})

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/score", score)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self.stop = asyncio.Event()
            self.loop = asyncio.get_running_loop()
            self.ready.set()
            await self.stop.wait()
            await runner.cleanup()

        asyncio.run(main())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_option_runs_a_step(tmp_path: Path, variant: str) -> None:
    server = RewardServer()
    try:
        cmd = [
            sys.executable,
            "-m",
            "engine.launch",
            str(EVERY),
            f"output_dir={tmp_path}",
            "run_name=run",
            f"rollout.rm_url=http://127.0.0.1:{server.port}/score",
            "--no-progress",
            *VARIANTS[variant],
        ]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = rows[-1]
    assert train["rollout/samples"] == 16 and 0.0 <= train["rollout/reward_mean"] <= 1.0
    for key in ("train/loss", "train/grad_norm", "train/lr", "train/entropy", "train/advantages"):
        assert key in train, key
    if variant.startswith("ppo"):
        for key in ("train/value_loss", "train/critic_grad_norm", "train/tis_weight"):
            assert key in train, key
        assert train["train/advantages"] == pytest.approx(0.0, abs=1e-5)  # whitened
    else:
        assert "train/kl_loss" in train and "train/value_loss" not in train
    evals = [r for r in rows if "eval/arithmetic/pass@3" in r]
    assert len(evals) == 2  # at step 0 and at the end
    # The reward server scored every training sample and every eval sample (200 prompts x 3, twice).
    assert server.requests == 16 + 2 * 200 * 3


def wrong_value(tp: typing.Any) -> typing.Any:
    """A value of the wrong type (or outside the choices) for a field of type tp."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Literal:
        return "bogus"
    if tp is bool or bool in args:
        return "maybe"
    if tp in (int, float) or int in args or float in args:
        return "many"
    if tp is str or str in args:
        return 12
    if typing.get_origin(tp) is dict or dict in args:
        return 3
    raise AssertionError(f"no wrong value for {tp}")


def every_key() -> list[tuple[str, str, typing.Any]]:
    keys = []
    for cls in (AlgoConfig, OptimizerConfig, EvalConfig):
        hints = typing.get_type_hints(cls)
        for field in cls.__struct_fields__:
            keys.append((cls.section_name, field, wrong_value(hints[field])))
    hints = typing.get_type_hints(RolloutConfig)
    keys += [("rollout", k, wrong_value(hints[k])) for k in REWARD_KEYS]
    return keys


def override(section: str, key: str, value: typing.Any) -> str:
    return f"{section}.{key}={json.dumps(value)}"


@pytest.mark.parametrize(("section", "key", "value"), every_key(), ids=lambda x: str(x))
def test_a_wrong_type_for_any_key_is_named(section: str, key: str, value: typing.Any) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(EVERY, [override(section, key, value)])
    assert (err.value.section, err.value.key) == (section, key), str(err.value)


OUT_OF_RANGE = [
    ("algo", "eps_clip", 1.5),
    ("algo", "eps_clip_high", -0.1),
    ("algo", "eps_clip_c", 0.5),
    ("algo", "gamma", 1.1),
    ("algo", "lambd", -0.5),
    ("algo", "critic_lr", 0.0),
    ("algo", "value_clip", -1.0),
    ("algo", "kl_loss_coef", -1.0),
    ("algo", "kl_coef", -0.1),
    ("algo", "entropy_coef", -0.1),
    ("algo", "tis_clip", 0.0),
    ("algo", "tis_clip_low", 3.0),
    ("algo", "custom_loss_function_path", "tests.losses_custom:reinforce"),
    ("optimizer", "lr", 0.0),
    ("optimizer", "min_lr", 1.0),
    ("optimizer", "lr_warmup_iters", -1),
    ("optimizer", "lr_decay_iters", 0),
    ("optimizer", "weight_decay", -0.1),
    ("optimizer", "adam_beta1", 1.0),
    ("optimizer", "adam_beta2", -0.1),
    ("optimizer", "adam_eps", 0.0),
    ("optimizer", "sgd_momentum", -1.0),
    ("optimizer", "clip_grad", -1.0),
    ("eval", "interval", -1),
    ("eval", "n_samples_per_eval_prompt", 0),
    ("eval", "top_p", 1.5),
    ("eval", "top_k", 0),
    ("eval", "temperature", -1.0),
    ("eval", "max_response_len", 0),
    ("rollout", "rm_type", "mathh"),
    ("rollout", "rm_url", "ftp://x"),
    ("rollout", "rm_timeout", 0.0),
    ("rollout", "rm_max_retries", -1),
    ("rollout", "rm_concurrency", 0),
    ("rollout", "group_rm", True),
]


@pytest.mark.parametrize(("section", "key", "value"), OUT_OF_RANGE, ids=lambda x: str(x))
def test_a_value_out_of_range_for_any_key_is_named(section: str, key: str, value: typing.Any) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(EVERY, [override(section, key, value)])
    assert (err.value.section, err.value.key) == (section, key), str(err.value)
