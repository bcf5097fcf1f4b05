"""The run's configuration: one TOML file, one Struct per section, checked before anything starts.

Guarantees: an unknown section or key, a value of the wrong type, or a failed value check raises a
ConfigError naming the file, the line (when the key is in the file), the section and the key; a
`section.key=value` override from the command line is applied before checking and named when it is the
culprit. Cross-section constraints (the batch-size identity, parallel sizes against learner ranks) are
checked here, after each section's own checks.
"""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import msgspec

from engine.cluster import ClusterConfig
from engine.errors import ConfigError
from engine.learner.config import AlgoConfig, CkptConfig, ModelConfig, OptimizerConfig, PerfConfig
from engine.rollout.config import EvalConfig, InferenceConfig, RolloutConfig
from engine.rollout.sglang.config import check_sglang
from engine.transport import TransportConfig

SECTIONS = (
    "model",
    "ckpt",
    "rollout",
    "eval",
    "perf",
    "algo",
    "optimizer",
    "inference",
    "cluster",
    "transport",
)


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The whole run. Top-level keys name the run; everything else lives in a section."""

    run_name: str | None = None
    output_dir: str = "runs"
    seed: int = 1234
    tensorboard: bool = False
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    ckpt: CkptConfig
    rollout: RolloutConfig
    eval: EvalConfig = msgspec.field(default_factory=EvalConfig)
    perf: PerfConfig = msgspec.field(default_factory=PerfConfig)
    algo: AlgoConfig = msgspec.field(default_factory=AlgoConfig)
    optimizer: OptimizerConfig = msgspec.field(default_factory=OptimizerConfig)
    inference: InferenceConfig = msgspec.field(default_factory=InferenceConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    transport: TransportConfig = msgspec.field(default_factory=TransportConfig)

    def check(self) -> None:
        for name in SECTIONS:
            getattr(self, name).check()
        self._check_batch_sizes()
        self._check_parallel_sizes()
        check_sglang(self.inference, learner_ranks=self.cluster.learner_ranks)
        if self.inference.colocate and self.rollout.max_staleness > 0:
            raise ConfigError(
                "inference.colocate = true needs rollout.max_staleness = 0 "
                f"(got {self.rollout.max_staleness}): colocated learner and engines take turns on the "
                "same devices, so nothing generates ahead",
                section="rollout",
                key="max_staleness",
            )

    def _check_batch_sizes(self) -> None:
        r = self.rollout
        samples = r.batch_size * r.n_samples_per_prompt
        identity = (
            f"rollout.batch_size={r.batch_size} x rollout.n_samples_per_prompt={r.n_samples_per_prompt} "
            f"= {samples}"
        )
        if r.global_batch_size is None:
            if samples % r.num_steps_per_rollout:
                raise ConfigError(
                    f"{identity} is not divisible by "
                    f"rollout.num_steps_per_rollout={r.num_steps_per_rollout}, "
                    "so no global_batch_size satisfies batch_size x n_samples_per_prompt = "
                    "global_batch_size x num_steps_per_rollout",
                    section="rollout",
                    key="num_steps_per_rollout",
                )
            return
        trained = r.global_batch_size * r.num_steps_per_rollout
        if samples != trained:
            raise ConfigError(
                f"batch sizes disagree: {identity}, but rollout.global_batch_size={r.global_batch_size} x "
                f"rollout.num_steps_per_rollout={r.num_steps_per_rollout} = {trained}; "
                "batch_size x n_samples_per_prompt must equal global_batch_size x num_steps_per_rollout",
                section="rollout",
                key="global_batch_size",
            )

    def _check_parallel_sizes(self) -> None:
        tp, ranks = self.perf.tensor_model_parallel_size, self.cluster.learner_ranks
        if ranks % tp:
            raise ConfigError(
                f"cluster.learner_ranks={ranks} is not divisible by perf.tensor_model_parallel_size={tp}",
                section="perf",
                key="tensor_model_parallel_size",
            )
        pp = self.perf.pipeline_model_parallel_size
        if ranks % (tp * pp):
            raise ConfigError(
                f"cluster.learner_ranks={ranks} is not divisible by perf.tensor_model_parallel_size={tp} x "
                f"perf.pipeline_model_parallel_size={pp}",
                section="perf",
                key="pipeline_model_parallel_size",
            )
        cp = self.perf.context_parallel_size
        if ranks % (tp * pp * cp):
            raise ConfigError(
                f"cluster.learner_ranks={ranks} is not divisible by perf.tensor_model_parallel_size={tp} x "
                f"perf.pipeline_model_parallel_size={pp} x perf.context_parallel_size={cp}",
                section="perf",
                key="context_parallel_size",
            )
        dp = ranks // (tp * pp * cp)
        dp_of = f"(cluster.learner_ranks={ranks} / perf.tensor_model_parallel_size={tp}" + (
            f" / perf.pipeline_model_parallel_size={pp}" if pp > 1 else ""
        )
        dp_of += f" / perf.context_parallel_size={cp})" if cp > 1 else ")"
        ep = self.perf.expert_model_parallel_size
        if dp % ep:
            raise ConfigError(
                f"the data-parallel size {dp} {dp_of} is not divisible by "
                f"perf.expert_model_parallel_size={ep}",
                section="perf",
                key="expert_model_parallel_size",
            )
        gbs = self.rollout.derived_global_batch_size
        if gbs % dp:
            raise ConfigError(
                f"global batch size {gbs} is not divisible by the data-parallel size {dp} {dp_of}",
                section="rollout",
                key="global_batch_size",
            )


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value). The value is read as TOML, else as a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    path, raw = item.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """Apply overrides in place; returns {"section.key": original text} for error messages."""
    applied = {}
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {key!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
        applied[".".join(keys)] = item
    return applied


_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]+)`")
_MISSING = re.compile(r"Object missing required field `(?P<key>[^`]+)`")


def _keys_of(section: str | None) -> list[str]:
    """The valid keys of a section (or the top-level keys and sections when section is None)."""
    fields = {f.name: f.type for f in msgspec.structs.fields(Config)}
    if section is None:
        return list(fields)
    return [f.name for f in msgspec.structs.fields(fields[section])] if section in fields else []


def _field_type(section: str, key: str) -> Any:
    fields = {f.name: f.type for f in msgspec.structs.fields(Config)}
    if section not in fields:
        return None
    return {f.name: f.type for f in msgspec.structs.fields(fields[section])}.get(key.split(".")[0])


def _lookup(data: dict[str, Any], parts: list[str]) -> Any:
    node: Any = data
    for p in parts:
        if isinstance(node, list) and p.isdigit() and int(p) < len(node):
            node = node[int(p)]
        elif isinstance(node, dict) and p in node:
            node = node[p]
        else:
            return None
    return node


def _translate(err: msgspec.ValidationError, data: dict[str, Any]) -> ConfigError:
    """Turn msgspec's "<problem> - at `$.section.key`" into a ConfigError with section, key and value."""
    m = _AT.match(str(err))
    msg, path = (m.group("msg"), m.group("path") or "") if m else (str(err), "")
    parts = [p for p in re.split(r"[.\[\]]", path) if p]
    section, key = (parts[0] if parts else None), (".".join(parts[1:]) or None)
    if u := _UNKNOWN.match(msg):
        if section is None:
            return ConfigError(
                f"unknown key or section (valid: {', '.join(_keys_of(None))})", key=u.group("key")
            )
        key, msg = (
            ".".join([*parts[1:], u.group("key")]),
            f"unknown key (valid keys: {', '.join(_keys_of(section))})",
        )
    elif u := _MISSING.match(msg):
        if section is None:
            return ConfigError("required section is missing", section=u.group("key"))
        key, msg = ".".join([*parts[1:], u.group("key")]), "required key is missing"
    elif section is not None and key is not None:
        choices = typing.get_args(_field_type(section, key))
        if choices and all(isinstance(c, str) for c in choices):
            msg = f"must be one of {', '.join(map(repr, choices))}"
        msg = f"{msg} (value: {_lookup(data, parts)!r})"
    return ConfigError(msg, section=section, key=key)


def locate(text: str, section: str | None, key: str | None) -> int | None:
    """1-based line of `key` inside `[section]` in TOML text (or of the section header), if present."""
    current = None
    header_line = None
    first_key = key.split(".")[0] if key else None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if h := re.match(r"^\[\s*([^\]]+?)\s*\]", line):
            current = h.group(1)
            if current == section:
                header_line = lineno
            continue
        if first_key and current == section and re.match(rf"^\"?{re.escape(first_key)}\"?\s*=", line):
            return lineno
        if (
            first_key
            and section
            and current is None
            and re.match(rf"^{re.escape(section)}\.{re.escape(first_key)}\s*=", line)
        ):
            return lineno
    return header_line


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override, parse and check a config file. Every failure is a ConfigError naming file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror}", file=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", file=str(path)) from None
    applied = apply_overrides(data, overrides or [])
    try:
        try:
            config = msgspec.convert(data, Config, strict=True)
        except msgspec.ValidationError as e:
            raise _translate(e, data) from None
        config.check()
    except ConfigError as e:
        dotted = ".".join(p for p in (e.section, e.key) if p)
        culprit = next(
            (
                item
                for k, item in applied.items()
                if k == dotted or f"{k}.".startswith(f"{dotted}.") or f"{dotted}.".startswith(f"{k}.")
            ),
            None,
        )
        if dotted and culprit:
            raise ConfigError(
                f"{e.message} (from command-line override {culprit!r})", section=e.section, key=e.key
            ) from None
        raise e.located(str(path), locate(text, e.section, e.key)) from None
    return config
