"""Run-config schema: loading, overrides, validation messages, round trips, shipped configs, docs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from kaggletrain.config import (
    RunConfig,
    config_from_dict,
    config_reference_markdown,
    load_config,
    parse_override,
    save_config,
)
from kaggletrain.errors import ConfigError, KaggletrainError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kwargs)
    assert isinstance(e.value, KaggletrainError)
    msg = str(e.value)
    assert "\n" not in msg, "errors must be one line"
    return msg


# ------------------------------------------------------------------------------------------------
# Shipped configs
# ------------------------------------------------------------------------------------------------


def test_expected_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"tiny.yaml", "shakespeare_char.yaml", "rwkv7_0.1b_t4.yaml", "rwkv7_0.1b_t4x2.yaml",
            "rwkv7_0.1b_h100.yaml", "state_tuning.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_round_trips(path: Path, tmp_path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    cfg.model_config(vocab_size=97)  # the architecture is valid (97: a stand-in char vocabulary)
    cfg.validate_for_world_size(1)
    saved = save_config(cfg, tmp_path / "config.yaml")
    assert load_config(saved) == cfg


def test_tiny_config_is_a_cpu_byte_builtin_run():
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert cfg.data.source == "builtin" and cfg.data.tokenizer == "byte"
    assert cfg.train.device == "cpu"
    assert cfg.model["num_layers"] <= 4 and 64 <= cfg.model["hidden_size"] <= 128
    assert cfg.model_config().vocab_size == 256


def test_gpu_configs_match_their_hardware():
    t4 = load_config(REPO / "configs" / "rwkv7_0.1b_t4.yaml")
    t4x2 = load_config(REPO / "configs" / "rwkv7_0.1b_t4x2.yaml")
    h100 = load_config(REPO / "configs" / "rwkv7_0.1b_h100.yaml")
    for cfg in (t4, t4x2, h100):
        m = cfg.model_config()
        assert (m.num_layers, m.hidden_size, m.vocab_size) == (12, 768, 65536)
        assert cfg.data.tokenizer == "world"
    assert t4.train.precision == "fp16" and t4x2.train.precision == "fp16" and h100.train.precision == "bf16"
    assert t4x2.validate_for_world_size(2) >= 1
    st = load_config(REPO / "configs" / "state_tuning.yaml")
    assert st.train.state_tuning and st.model["rwkv_use_learnable_states"] and st.model["init_from"]


# ------------------------------------------------------------------------------------------------
# Defaults, overrides, round trips
# ------------------------------------------------------------------------------------------------


def test_defaults_and_derived_names(tmp_path: Path):
    cfg = load_config(write(tmp_path, "train: {lr: 1.0e-3}\n", "my_run.yaml"))
    assert cfg.name == "my_run" and cfg.out_dir == "runs/my_run"
    assert cfg.train.lr == 1e-3 and cfg.train.batch_size == 16
    assert cfg.model["vocab_size"] is None and cfg.model["init_from"] is None
    # out_dir follows a renamed run unless set explicitly
    assert load_config(tmp_path / "my_run.yaml", ["name=other"]).out_dir == "runs/other"


def test_model_section_keys_come_from_model_config():
    from kaggletrain.model.config import ModelConfig

    cfg = config_from_dict({})
    assert set(cfg.model) == {f.name for f in dataclasses.fields(ModelConfig)} | {"init_from"}
    assert cfg.model.hidden_size == cfg.model["hidden_size"]  # attribute access too


def test_overrides_use_yaml_scalar_rules(tmp_path: Path):
    path = write(tmp_path, "model: {num_layers: 2, hidden_size: 64}\ndata: {val_source: v.txt}\n")
    cfg = load_config(path, overrides=[
        "train.lr=3e-4", "model.num_layers=6", "train.betas=[0.9,0.95]", "model.attention_layers=[1,3]",
        "data.source=null", "data.val_source=null", "checkpoint.resume=auto", "train.max_steps=1e4",
        "name=exp1",
    ])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model["num_layers"] == 6 and cfg.model["hidden_size"] == 64
    assert cfg.train.betas == (0.9, 0.95)
    assert cfg.model["attention_layers"] == [1, 3]
    assert cfg.data.source == "builtin" and cfg.data.val_source is None
    assert cfg.checkpoint.resume == "auto"
    assert cfg.train.max_steps == 10000 and isinstance(cfg.train.max_steps, int)
    assert cfg.name == "exp1"


def test_parse_override():
    assert parse_override("train.lr=3e-4") == ("train.lr", "3e-4")
    assert parse_override("data.separator=a=b") == ("data.separator", "a=b")
    assert parse_override("data.val_source=") == ("data.val_source", None)


def test_to_dict_save_and_reload_are_equal(tmp_path: Path):
    cfg = config_from_dict(
        {"name": "rt", "model": {"num_layers": 3, "hidden_size": 128, "layer_pattern": "RRA"},
         "train": {"betas": [0.8, 0.9], "min_lr": 1e-5}, "data": {"separator": "\n<|end|>\n"}},
    )
    assert config_from_dict(cfg.to_dict()) == cfg
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    text = path.read_text()
    assert text.startswith("# Resolved kaggletrain config")
    assert load_config(path) == cfg
    reloaded = yaml.safe_load(text)
    assert set(reloaded) == {"name", "out_dir", "model", "data", "train", "checkpoint", "logging"}
    assert not list(tmp_path.joinpath("out").glob(".*tmp*")), "no temporary files left behind"


def test_model_config_vocab_size_resolution():
    assert config_from_dict({}).model_config().vocab_size == 256  # byte
    assert config_from_dict({"data": {"tokenizer": "world"}}).model_config().vocab_size == 65536
    char = config_from_dict({"data": {"tokenizer": "char"}})
    assert "vocab_size" in error_of(char.model_config)
    assert char.model_config(vocab_size=65).vocab_size == 65
    fixed = config_from_dict({"model": {"vocab_size": 300}})
    assert fixed.model_config(vocab_size=256).vocab_size == 300  # an explicit config value wins


def test_batch_arithmetic_for_world_sizes():
    cfg = config_from_dict({"train": {"batch_size": 32, "micro_batch_size": 8}})
    assert cfg.validate_for_world_size(1) == 4
    assert cfg.validate_for_world_size(2) == 2
    assert cfg.validate_for_world_size(4) == 1
    assert "micro_batch_size" in error_of(cfg.validate_for_world_size, 8)  # 8 x 8 > 32
    assert "3 processes" in error_of(cfg.validate_for_world_size, 3)
    auto = config_from_dict({"train": {"batch_size": 12}})
    assert auto.validate_for_world_size(3) == 1 and auto.train.micro_batch(3) == 4
    assert auto.train.accumulation_steps(1) == 1


def test_min_lr_defaults_to_a_tenth():
    assert config_from_dict({"train": {"lr": 1e-3}}).train.final_lr() == pytest.approx(1e-4)


# ------------------------------------------------------------------------------------------------
# Error messages
# ------------------------------------------------------------------------------------------------


def test_unknown_key_names_file_path_line_and_suggestion(tmp_path: Path):
    path = write(tmp_path, "train:\n  seq_len: 64\n  lrr: 0.1\n", "x.yaml")
    msg = error_of(load_config, path)
    assert msg == f"{path}: train.lrr: unknown key; did you mean 'lr'? (line 3)"


def test_unknown_section_and_top_level_key(tmp_path: Path):
    assert "did you mean 'train'" in error_of(load_config, write(tmp_path, "trian: {}\n"))
    msg = error_of(load_config, write(tmp_path, "colour: red\n"))
    assert "colour: unknown key" in msg and "valid keys" in msg


@pytest.mark.parametrize("text, expected", [
    ("train: {lr: abc}", "train.lr: expected a number > 0, got 'abc'"),
    ("train: {lr: -1}", "train.lr: expected a number > 0, got -1"),
    ("train: {lr: .nan}", "train.lr: expected a number > 0, got nan"),
    ("train: {batch_size: 2.5}", "train.batch_size: expected an integer >= 1, got 2.5"),
    ("train: {batch_size: true}", "train.batch_size: expected an integer >= 1, got True"),
    ("train: {batch_size: 0}", "train.batch_size: expected an integer >= 1, got 0"),
    ("train: {l2wrap: 1}", "train.l2wrap: expected true or false, got 1"),
    ("train: {betas: [0.9]}", "train.betas: expected a list of 2 numbers each in [0, 1), got [0.9]"),
    ("train: {betas: [0.9, 1.5]}", "train.betas: expected a list of 2 numbers each in [0, 1)"),
    ("train: {precision: bf17}", "train.precision: expected one of 'auto', 'fp32', 'fp16', 'bf16', got 'bf17' (did you mean 'bf16'?)"),
    ("data: {val_fraction: 1.0}", "data.val_fraction: expected a number in [0, 1), got 1.0"),
    ("data: {tokenizer: null}", "data.tokenizer: expected one of 'byte', 'char', 'world', got null"),
    ("checkpoint: {resume: maybe}", "checkpoint.resume: expected true, false or 'auto', got 'maybe'"),
    ("model: {attention_layers: [a]}", "model.attention_layers: expected a list of integers, got ['a']"),
    ("model: {num_layers: many}", "model.num_layers: expected an integer, got 'many'"),
    ("train: [1, 2]", "train: expected a mapping of keys, got a list"),
    ("name: 'a/b'", "name: expected letters, digits"),
])
def test_type_and_range_errors(tmp_path: Path, text: str, expected: str):
    path = write(tmp_path, text + "\n", "x.yaml")
    msg = error_of(load_config, path)
    assert msg.startswith(f"{path}: "), msg
    assert expected in msg


def test_model_config_errors_are_rehomed_to_the_model_section(tmp_path: Path):
    path = write(tmp_path, "model:\n  hidden_size: 100\n  head_size: 64\n")
    msg = error_of(load_config, path)
    assert msg.startswith(f"{path}: model.hidden_size:") and "head_size" in msg and "(line 2)" in msg
    msg = error_of(load_config, write(tmp_path, "model: {num_layers: 2, attention_layers: [5]}\n"))
    assert "model.attention_layers:" in msg


@pytest.mark.parametrize("data, expected", [
    ({"train": {"lr": 1e-4, "min_lr": 1e-3}}, "train.min_lr: must not exceed train.lr"),
    ({"train": {"batch_size": 16, "micro_batch_size": 5}}, "train.micro_batch_size:"),
    ({"train": {"state_tuning": True}}, "train.state_tuning: needs model.rwkv_use_learnable_states"),
    ({"model": {"use_position_embeddings": True, "max_position_embeddings": 64}, "train": {"seq_len": 128}},
     "train.seq_len: 128 exceeds model.max_position_embeddings=64"),
    ({"data": {"encoding": "klingon"}}, "data.encoding: unknown text encoding"),
    ({"data": {"format": "binidx", "tokenizer": "char"}}, "data.tokenizer:"),
    ({"data": {"source": " "}}, "data.source:"),
    ({"data": {"tokenizer": "byte", "document_end": "eos"}},
     "cfg.yaml: data.document_end: eos needs data.tokenizer: world (the byte tokenizer has no end-of-document token)"),
])
def test_cross_field_rules(data, expected):
    assert expected in error_of(config_from_dict, data, source="cfg.yaml")


@pytest.mark.parametrize("text, expected", [
    ("- a\n- b\n", "expected a mapping of sections (model, data, train, ...) at the top level, got a list"),
    ("just a string\n", "at the top level, got the text 'just a string'"),
    ("", "the config is empty"),
    ("# only a comment\n", "the config is empty"),
    ("train:\n  lr: [1, 2\n", "line 3, column 1: YAML syntax error"),
    ("train:\n  lr: 1\n lr: 2\n", "YAML syntax error"),
    ("train:\n  lr: 1\n  lr: 2\n", "line 3, column 3: YAML syntax error: duplicate key 'lr' (first on line 2)"),
    ("a: !!python/object:os.system {}\n", "YAML syntax error"),
    ("train: {}\nname: a\x1fb\n", "line 2: YAML syntax error: control character #x1f is not allowed"),
])
def test_bad_yaml_files(tmp_path: Path, text: str, expected: str):
    path = write(tmp_path, text, "x.yaml")
    msg = error_of(load_config, path)
    assert msg.startswith(f"{path}: ") and expected in msg, msg


def test_missing_unreadable_and_binary_files(tmp_path: Path):
    assert "config file not found" in error_of(load_config, tmp_path / "nope.yaml")
    assert "is a directory" in error_of(load_config, tmp_path)
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    assert "not a UTF-8 text file" in error_of(load_config, binary)
    nul = tmp_path / "n.yaml"
    nul.write_bytes(b"train: {}\n\x00\x00")
    assert "binary" in error_of(load_config, nul)


def test_override_errors_name_the_override(tmp_path: Path):
    path = write(tmp_path, "train: {lr: 1.0e-3}\n")
    assert error_of(load_config, path, ["train.lrr=1"]) == "override 'train.lrr=1': train.lrr: unknown key; did you mean 'lr'?"
    assert error_of(load_config, path, ["train.lr=abc"]).startswith("override 'train.lr=abc': train.lr: expected a number")
    assert "trian: unknown key; did you mean 'train'" in error_of(load_config, path, ["trian.lr=1"])
    assert "expected KEY=VALUE" in error_of(load_config, path, ["train.lr"])
    assert "'train.lr' is not a section" in error_of(load_config, path, ["train.lr.x=1"])
    assert "cannot parse the value" in error_of(load_config, path, ["train.betas=[0.9,"])
    assert "dotted key" in error_of(load_config, path, ["=3"])


def test_config_from_dict_rejects_non_mappings():
    assert "expected a mapping" in error_of(config_from_dict, [1, 2])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Reference documentation
# ------------------------------------------------------------------------------------------------


def test_every_key_has_help_and_appears_in_the_reference():
    doc = config_reference_markdown()
    cfg = config_from_dict({})
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            assert f"## `{section}`" in doc
            for key in values:
                assert f"| `{key}` |" in doc, f"{section}.{key} missing from the reference"
        else:
            assert f"| `{section}` |" in doc
    for line in doc.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            assert len(cells) == 4 and all(cells), f"incomplete row: {line}"


def test_committed_reference_is_up_to_date():
    committed = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == config_reference_markdown(), (
        "docs/configuration.md is stale: run `python -m kaggletrain.config > docs/configuration.md`"
    )
