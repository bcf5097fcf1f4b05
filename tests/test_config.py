"""Config parsing: every shipped config parses; bad input names section, key, values and line."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from engine.config import Config, load_config, parse_override
from engine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("**/*.toml"))

BASE = """\
seed = 3

[ckpt]
hf_checkpoint = "some/model"

[rollout]
prompt_data = "p.jsonl"
batch_size = 4
n_samples_per_prompt = 8
global_batch_size = 32
num_rollout = 3
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_parses(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, Config)
    r = config.rollout
    assert r.batch_size * r.n_samples_per_prompt == r.derived_global_batch_size * r.num_steps_per_rollout


def test_shipped_configs_exist() -> None:
    assert any(p.name == "quickstart.toml" for p in SHIPPED)


def test_defaults_and_derived_global_batch(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, BASE.replace("global_batch_size = 32\n", "num_steps_per_rollout = 2\n"))
    )
    assert config.rollout.derived_global_batch_size == 16
    assert config.algo.eps_clip == 0.2 and config.algo.kl_loss_type == "low_var_kl"
    assert config.inference.backend == "embedded"


def test_unknown_key_names_section_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "tempreature = 0.7\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    e = err.value
    assert (e.section, e.key, e.line) == ("rollout", "tempreature", 12)
    assert str(path) in str(e) and "temperature" in str(e)  # the valid keys are listed


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key or section") as err:
        load_config(write(tmp_path, BASE + "[rollot]\nx = 1\n"))
    assert err.value.key == "rollot"


def test_wrong_type_names_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE.replace("batch_size = 4", 'batch_size = "four"')))
    e = err.value
    assert (e.section, e.key, e.line) == ("rollout", "batch_size", 8)
    assert "'four'" in str(e) and "int" in str(e)


def test_enum_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be one of 'k1', 'k2', 'k3', 'low_var_kl'"):
        load_config(write(tmp_path, BASE + '[algo]\nkl_loss_type = "k9"\n'))


def test_missing_required_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE.replace('prompt_data = "p.jsonl"\n', "")))
    assert (err.value.section, err.value.key) == ("rollout", "prompt_data")


def test_batch_constraint_names_all_four_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, BASE.replace("global_batch_size = 32", "global_batch_size = 12")))
    text = str(err.value)
    for part in ("batch_size=4", "n_samples_per_prompt=8", "global_batch_size=12", "num_steps_per_rollout=1"):
        assert part in text
    assert err.value.line == 10


def test_value_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[rollout\] top_p: must be in \(0, 1\]"):
        load_config(write(tmp_path, BASE + "top_p = 1.5\n"))
    with pytest.raises(ConfigError, match="use_kl_loss"):
        load_config(write(tmp_path, BASE + "[algo]\nkl_loss_coef = 0.1\n"))
    with pytest.raises(ConfigError, match="Transformer Engine"):
        load_config(write(tmp_path, BASE + "[perf]\nsequence_parallel = true\n"))


def test_parallel_sizes_against_ranks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="learner_ranks=3 is not divisible"):
        load_config(
            write(tmp_path, BASE + "[perf]\ntensor_model_parallel_size = 2\n[cluster]\nlearner_ranks = 3\n")
        )
    with pytest.raises(ConfigError, match="data-parallel size 3"):
        load_config(write(tmp_path, BASE + "[cluster]\nlearner_ranks = 3\n"))


def test_overrides_apply_and_are_named_in_errors(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    config = load_config(path, ["rollout.batch_size=8", "rollout.global_batch_size=64", 'ckpt.save="out"'])
    assert config.rollout.batch_size == 8 and config.ckpt.save == "out"
    config = load_config(path, ["eval.datasets.math=/data/m.jsonl", "eval.interval=2", "ckpt.load=/some/dir"])
    assert config.eval.datasets == {"math": "/data/m.jsonl"} and config.ckpt.load == "/some/dir"
    with pytest.raises(ConfigError, match=re.escape("from command-line override 'rollout.top_k=0'")):
        load_config(path, ["rollout.top_k=0"])
    with pytest.raises(ConfigError, match=re.escape("from command-line override 'perf.bogus=1'")):
        load_config(path, ["perf.bogus=1"])


def test_parse_override_values() -> None:
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=1e-4") == (["a", "b"], 1e-4)
    assert parse_override("a.b=true") == (["a", "b"], True)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=plain/path") == (["a", "b"], "plain/path")
    with pytest.raises(ConfigError):
        parse_override("no_equals_sign")


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[rollout\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")
