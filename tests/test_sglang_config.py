"""[inference] SGLang keys: command lines built from [inference.sglang] use SGLang 0.5.9's argument
names (recorded in tests/data from its server_args.py), bad keys are errors that name them, and the
launch path says plainly when sglang is not installed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from engine.config import load_config
from engine.errors import ConfigError, EngineError
from engine.rollout.config import InferenceConfig
from engine.rollout.sglang.colocate import ColocatedPlacement
from engine.rollout.sglang.launch import server_spec
from engine.rollout.sglang.server import ServerSpec, SglangServerActor
from engine.rollout.sglang.server_args import server_command

ROOT = Path(__file__).resolve().parents[1]
ARGS = json.loads((ROOT / "tests" / "data" / "sglang_0.5.9_server_args.json").read_text())["arguments"]
QUICKSTART = ROOT / "configs" / "quickstart.toml"


def check_against_sglang(argv: list[str]) -> None:
    """Every option word is an SGLang 0.5.9 argument, flags stand alone, values follow the others."""
    i = 0
    while i < len(argv):
        word = argv[i]
        assert word in ARGS, f"{word} is not an SGLang 0.5.9 server argument"
        values = 0
        while i + 1 + values < len(argv) and not argv[i + 1 + values].startswith("--"):
            values += 1
        expected = {"flag": (0, 0), "value": (1, 1), "list": (1, 10**6)}[ARGS[word]]
        assert expected[0] <= values <= expected[1], (word, ARGS[word], argv[i + 1 : i + 1 + values])
        i += 1 + values


def config(tmp_path: Path, sglang: str, *overrides: str):
    path = tmp_path / "c.toml"
    path.write_text(QUICKSTART.read_text() + f"\n[inference.sglang]\n{sglang}\n")
    return load_config(path, ["inference.backend=sglang", "inference.num_gpus=4", *overrides])


def test_command_line_forwards_every_key(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        "mem_fraction_static = 0.7\nenable_memory_saver = true\ndisable_radix_cache = false\n"
        'cuda_graph_bs = [1, 2, 4]\ndtype = "bfloat16"\nlog_level = "warning"',
        "inference.num_gpus_per_engine=2",
    ).inference
    argv = server_command(
        model_path="/m", host="10.0.0.2", port=30001, tp_size=cfg.num_gpus_per_engine, weight_version=3,
        args=cfg.sglang, launcher=["python", "-m", "sglang.launch_server"],
    )  # fmt: skip
    assert argv == [
        "python", "-m", "sglang.launch_server",
        "--model-path", "/m", "--host", "10.0.0.2", "--port", "30001",
        "--tp-size", "2", "--weight-version", "3",
        "--mem-fraction-static", "0.7", "--enable-memory-saver", "--cuda-graph-bs", "1", "2", "4",
        "--dtype", "bfloat16", "--log-level", "warning",
    ]  # fmt: skip
    check_against_sglang(argv[3:])


def test_colocated_command_line(tmp_path: Path) -> None:
    """Colocated servers get SGLang's memory saver and half the GPU's static memory unless the table
    says otherwise; the launcher and the GPUs the server sees come from [inference] and the placement."""
    launcher = "inference.server_launcher=['/opt/sgl/bin/python', '-m', 'sglang.launch_server']"
    cfg = config(
        tmp_path, 'dtype = "bfloat16"', "inference.colocate=true", "cluster.learner_ranks=4",
        "inference.num_gpus_per_engine=2", launcher,
    ).inference  # fmt: skip
    gpus = ["GPU-a", "GPU-b", "GPU-c", "GPU-d"]
    spec = server_spec(cfg, "/m", visible_devices=ColocatedPlacement.visible_devices(1, 2, gpus))
    assert spec.visible_devices == ["GPU-c", "GPU-d"]  # server 1 spans learner ranks 2 and 3
    argv = server_command(
        model_path=spec.model_path, host="10.0.0.2", port=30001, tp_size=spec.tp_size, weight_version=0,
        args=spec.args, launcher=spec.launcher,
    )  # fmt: skip
    assert argv == [
        "/opt/sgl/bin/python", "-m", "sglang.launch_server",
        "--model-path", "/m", "--host", "10.0.0.2", "--port", "30001", "--tp-size", "2",
        "--weight-version", "0", "--enable-memory-saver", "--mem-fraction-static", "0.5",
        "--dtype", "bfloat16",
    ]  # fmt: skip
    check_against_sglang(argv[3:])
    mine = config(tmp_path, "mem_fraction_static = 0.7", "inference.colocate=true").inference
    assert server_spec(mine, "/m").args == {"enable_memory_saver": True, "mem_fraction_static": 0.7}
    assert ColocatedPlacement.visible_devices(0, 1, gpus[:1]) is None  # one GPU: the one Ray gives
    apart = config(tmp_path, "mem_fraction_static = 0.7").inference  # not colocated: only the table
    assert (
        server_spec(apart, "/m").args == {"mem_fraction_static": 0.7}
        and server_spec(apart, "/m").launcher is None
    )


def test_the_check_catches_a_misspelt_argument() -> None:
    argv = server_command(
        model_path="/m", host="h", port=1, tp_size=1, weight_version=0, args={"mem_fraction_statc": 0.5}
    )
    with pytest.raises(AssertionError, match="--mem-fraction-statc is not an SGLang"):
        check_against_sglang(argv[3:])
    with pytest.raises(AssertionError, match="enable-memory-saver"):  # a flag given a value
        check_against_sglang(["--enable-memory-saver", "1"])


@pytest.mark.parametrize(
    ("sglang", "overrides", "key", "message"),
    [
        ("", ["inference.num_gpus=3", "inference.num_gpus_per_engine=2"], "num_gpus", "do not divide"),
        ("tp_size = 2", [], "sglang.tp_size", "num_gpus_per_engine"),
        ("port = 30000", [], "sglang.port", "free port"),
        ("bad = {a = 1}", [], "sglang.bad", "string, number, boolean"),
        ("MemFraction = 0.5", [], "sglang.MemFraction", "snake_case"),
        ("", ["inference.engine_urls=['localhost:1']"], "engine_urls[0]", "http"),
        ("", ["inference.engine_urls=['http://a:1']"], "num_gpus", "started elsewhere"),
        ("", ["inference.router_url='http://r:1'"], "router_url", "engine_urls"),
        ("", ["inference.num_gpus_per_engine=0"], "num_gpus_per_engine", "> 0"),
        ("", ["inference.colocate=true", "cluster.learner_ranks=4", "inference.num_gpus_per_engine=3"],
         "num_gpus_per_engine", "learner.s 4 GPUs"),
        ("enable_memory_saver = false", ["inference.colocate=true"], "sglang.enable_memory_saver",
         "memory saver"),
        ("", ["inference.server_launcher=['python', ' ']"], "server_launcher[1]", "empty"),
        ("", ["inference.engine_urls=['http://a:1']", "inference.server_launcher=['x']"], "server_launcher",
         "started elsewhere"),
    ],
)  # fmt: skip
def test_bad_sglang_keys_name_the_key(
    tmp_path: Path, sglang: str, overrides: list[str], key: str, message: str
):
    with pytest.raises(ConfigError, match=message) as e:
        config(tmp_path, sglang, *overrides)
    assert (e.value.section, e.value.key) == ("inference", key)


def test_sglang_keys_need_the_sglang_backend(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(QUICKSTART.read_text() + "\n[inference.sglang]\nmem_fraction_static = 0.5\n")
    with pytest.raises(ConfigError, match="backend = 'embedded'") as e:
        load_config(path)
    assert e.value.key == "sglang"
    assert InferenceConfig().backend == "embedded"  # the default is unchanged


def test_sglang_needs_gpus_or_addresses(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(QUICKSTART.read_text())
    with pytest.raises(ConfigError, match="needs num_gpus") as e:
        load_config(path, ["inference.backend=sglang"])
    assert e.value.key == "num_gpus"
    ok = load_config(path, ["inference.backend=sglang", "inference.engine_urls=['http://10.0.0.5:30000']"])
    assert ok.inference.engine_urls == ["http://10.0.0.5:30000"]


def test_launch_without_sglang_is_a_clear_error() -> None:
    pytest.importorskip("ray")
    import importlib.util

    if importlib.util.find_spec("sglang") is not None:
        pytest.skip("sglang is installed here")
    actor = SglangServerActor(ServerSpec(model_path="/m"), 0)
    with pytest.raises(EngineError, match="sglang is not importable"):
        asyncio.run(actor.start())
