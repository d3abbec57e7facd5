"""Config fuzzing (issue 10): a mutated config either loads or raises ConfigError, nothing else.

Mutations: wrong types, out-of-range numbers, unknown keys and sections, missing or non-mapping
sections, and random command-line overrides; through dicts, YAML files and overrides. Configs that
load must survive the save/load round trip unchanged. Derandomised, so CI runs are reproducible.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaggletrain.config import (
    SECTION_NAMES,
    RunConfig,
    config_from_dict,
    load_config,
    save_config,
)
from kaggletrain.errors import ConfigError

BASE = config_from_dict(
    {"name": "fuzz", "model": {"hidden_size": 64, "num_layers": 2}, "train": {"seq_len": 32, "batch_size": 4}}
).to_dict()
KNOWN = {sec: sorted(BASE[sec]) for sec in SECTION_NAMES}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["auto", "cpu", "cuda", "fp16", "bf16", "byte", "char", "world", "3e-4", "1e4", "null",
                     "cosine", "ddp", "fsdp", "txt", "jsonl", "binidx", "RRA", "", "builtin"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
sections = st.sampled_from(list(SECTION_NAMES))


@st.composite
def mutation(draw):
    kind = draw(st.sampled_from(["set_known", "set_known", "set_known", "unknown_key", "drop_section",
                                 "section_value", "top_level"]))
    sec = draw(sections)
    if kind == "set_known":
        return (kind, sec, draw(st.sampled_from(KNOWN[sec])), draw(values))
    if kind == "unknown_key":
        return (kind, sec, draw(st.text(min_size=1, max_size=10)), draw(values))
    if kind == "section_value":
        return (kind, sec, None, draw(values))
    if kind == "top_level":
        return (kind, None, draw(st.sampled_from(["name", "out_dir", "extra", "trian"])), draw(values))
    return (kind, sec, None, None)


def mutate(base: dict, muts: list) -> dict:
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for kind, sec, key, value in muts:
        if kind in ("set_known", "unknown_key"):
            if not isinstance(d.get(sec), dict):
                d[sec] = {}
            d[sec][key] = value
        elif kind == "drop_section":
            d.pop(sec, None)
        elif kind == "section_value":
            d[sec] = value
        else:
            d[key] = value
    return d


def check_outcome(load) -> RunConfig | None:
    try:
        cfg = load()
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "Traceback" not in msg
        return None
    assert isinstance(cfg, RunConfig)
    assert config_from_dict(cfg.to_dict()) == cfg  # a loadable config always round trips
    return cfg


FUZZ = settings(max_examples=80, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(st.lists(mutation(), min_size=1, max_size=4))
def test_mutated_dicts_load_or_raise_config_error(muts):
    check_outcome(lambda: config_from_dict(mutate(BASE, muts), source="fuzz.yaml"))


@FUZZ
@given(st.lists(mutation(), min_size=1, max_size=3))
def test_mutated_yaml_files_load_or_raise_config_error(tmp_path: Path, muts):
    path = tmp_path / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump(mutate(BASE, muts), allow_unicode=True), encoding="utf-8")
    except (yaml.YAMLError, UnicodeEncodeError):
        return  # hypothesis produced something YAML cannot represent (e.g. lone surrogates)
    cfg = check_outcome(lambda: load_config(path))
    if cfg is not None:
        assert load_config(save_config(cfg, tmp_path / "saved.yaml")) == cfg


@FUZZ
@given(st.lists(st.one_of(
    st.builds(lambda s, k, v: f"{s}.{k}={v}", sections, st.sampled_from(sum(KNOWN.values(), [])),
              st.one_of(st.text(max_size=12), st.sampled_from(["[1,2]", "{a: 1}", "null", "-1", "1e9", "[", "'"]))),
    st.text(max_size=20),
), min_size=1, max_size=3))
def test_random_overrides_load_or_raise_config_error(tmp_path: Path, overrides):
    path = tmp_path / "base.yaml"
    if not path.exists():
        path.write_text(yaml.safe_dump(BASE), encoding="utf-8")
    check_outcome(lambda: load_config(path, overrides=overrides))


@FUZZ
@given(st.text(max_size=200))
def test_arbitrary_text_files_never_crash(tmp_path: Path, text: str):
    path = tmp_path / "any.yaml"
    try:
        path.write_text(text, encoding="utf-8", errors="strict")
    except UnicodeEncodeError:
        return
    check_outcome(lambda: load_config(path))
