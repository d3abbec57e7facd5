"""Checkpoints in and out: kaggletrain directories, official .pth (checked against the real `rwkv` package in
a subprocess), safetensors, learnable states, and clear errors for every kind of wrong file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from kaggletrain.cli import main as cli_main
from kaggletrain.errors import CheckpointError
from kaggletrain.interop import (detect_format, export_checkpoint, load_checkpoint, load_state_dict_any,
                                 save_weights, states_path_for)
from kaggletrain.model import RWKVModel
from tiny_models import make_model  # tests/tiny_models.py

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[3, 17, 255, 0, 42, 99, 7, 7, 128, 64, 5, 200, 1, 2, 3, 9, 77]])

# Runs in a fresh interpreter: RWKV_V7_ON must be set before `import rwkv`, and the package keeps its dtype
# and device in module globals. Prints the package's logits (and per-case max differences) as JSON.
RWKV_PKG_SCRIPT = r"""
import json, os, sys
os.environ["RWKV_V7_ON"] = "1"
import torch
from rwkv.model import RWKV
cases = json.loads(sys.argv[1])
out = {}
for name, case in cases.items():
    model = RWKV(model=case["path"], strategy="cpu fp32")
    state = None
    if case.get("states"):
        st = torch.load(case["states"], weights_only=True)
        state = model.generate_zero_state()
        for i in range(model.n_layer):
            state[3 * i] = st[f"blocks.{i}.att.shift_state"].clone()
            state[3 * i + 1] = st[f"blocks.{i}.att.time_state"].clone()
            state[3 * i + 2] = st[f"blocks.{i}.ffn.shift_state"].clone()
    y, _ = model.forward(case["ids"], state, full_output=True)
    out[name] = y.tolist()
print(json.dumps(out))
"""


def run_rwkv_package(cases: dict) -> dict:
    env = {**os.environ, "RWKV_V7_ON": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RWKV_PKG_SCRIPT, json.dumps(cases)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {k: torch.tensor(v) for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


# ---------------------------------------------------------------------------------------------------
def test_save_pretrained_roundtrip_is_exact(tmp_path):
    model = make_model(d_decay=32, d_gate=96)
    d = model.save_pretrained(tmp_path / "ck", tokenizer={"type": "byte"}, extra={"step": 7})
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["format"] == "kaggletrain" and cfg["version"] == 1 and cfg["step"] == 7
    assert cfg["model"] == model.config.to_dict()
    loaded, meta = load_checkpoint(d)
    assert meta["format"] == "kaggletrain" and meta["tokenizer"] == {"type": "byte"}
    assert loaded.config.to_dict() == model.config.to_dict()
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    assert RWKVModel.from_pretrained(d).config.lora_dims["g"] == 96
    assert detect_format(d) == "kaggletrain"
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_single_safetensors_file_carries_its_config(tmp_path):
    model = make_model(num_layers=3, attention_layers=[1], num_attention_heads=4, use_position_embeddings=True,
                       max_position_embeddings=64)
    reference = logits(model, IDS)
    model.optimize_for_inference()  # (re-lays some weights: the writer must not mind other strides)
    save_weights(model, tmp_path / "w.safetensors")
    assert detect_format(tmp_path / "w.safetensors") == "safetensors"
    loaded, _ = load_checkpoint(tmp_path / "w.safetensors")
    assert loaded.config.to_dict() == model.config.to_dict()
    assert torch.equal(logits(loaded, IDS), reference)
    sd = load_state_dict_any(tmp_path / "w.safetensors")
    assert set(sd) == set(model.state_dict())


def test_official_export_matches_rwkv_package(tmp_path):
    """fp32 export → the real rwkv package (subprocess) gives kaggletrain's logits to 1e-5, also with
    non-default LoRA sizes, and learnable states injected as the package's initial state."""
    plain = make_model(seed=1)
    odd = make_model(seed=2, num_layers=3, d_decay=64, d_aaa=32, d_mv=64, d_gate=32)
    stated = make_model(seed=3, rwkv_use_learnable_states=True)
    cases, ours = {}, {}
    for name, model in (("plain", plain), ("odd", odd), ("stated", stated)):
        ck = model.save_pretrained(tmp_path / name)
        rc = cli_main(["export", str(ck), "--format", "rwkv", "--dtype", "fp32", "--output",
                       str(tmp_path / f"{name}.pth")])
        assert rc == 0
        cases[name] = {"path": str(tmp_path / name), "ids": IDS[0].tolist()}
        ours[name] = logits(model, IDS)[0]
    # Learnable states are excluded from the .pth and written beside it.
    official = torch.load(tmp_path / "stated.pth", weights_only=True)
    assert not any("time_state" in k or "shift_state" in k for k in official)
    assert official["emb.weight"].dtype == torch.float32
    cases["stated"]["states"] = str(tmp_path / "stated.states.pth")

    ref = run_rwkv_package(cases)
    for name in cases:
        err = (ref[name] - ours[name]).abs().max().item()
        assert err < 1e-5, (name, err)


def test_official_import_bf16_without_unused_v_tensors(tmp_path):
    model = make_model(seed=4, num_layers=3, d_decay=64, d_aaa=32, d_mv=32, d_gate=160)
    unused = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")  # absent from early World releases
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k not in unused}
    torch.save(sd, tmp_path / "rwkv7-world.pth")
    loaded, meta = load_checkpoint(tmp_path / "rwkv7-world.pth")
    assert meta["format"] == "rwkv" and meta["source_dtype"] == "bfloat16"
    c = loaded.config
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.head_size) == (256, 128, 3, 64)
    assert c.lora_dims == {"w": 64, "a": 32, "v": 32, "g": 160}
    assert loaded.emb.weight.dtype == torch.float32
    reference = make_model(seed=4, num_layers=3, d_decay=64, d_aaa=32, d_mv=32, d_gate=160)
    reference.load_state_dict({k: v.float() for k, v in {**reference.state_dict(), **sd}.items()})
    assert torch.equal(logits(loaded, IDS), logits(reference, IDS))
    # keep_dtype: the file's own dtype
    assert load_checkpoint(tmp_path / "rwkv7-world.pth", dtype=None)[0].emb.weight.dtype == torch.bfloat16


def test_safetensors_export_with_states_roundtrips(tmp_path):
    model = make_model(seed=5, rwkv_use_learnable_states=True)
    with torch.no_grad():
        for p in model.learnable_state_parameters():
            p.normal_()
    written = export_checkpoint(model, tmp_path / "m.safetensors", format="safetensors", dtype="fp32")
    assert [p.name for p in written] == ["m.safetensors", "m.states.safetensors"]
    loaded, meta = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.config.rwkv_use_learnable_states and meta["states_file"].endswith("m.states.safetensors")
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    os.remove(tmp_path / "m.states.safetensors")  # the weights alone: a model without learnable states
    assert not load_checkpoint(tmp_path / "m.safetensors")[0].config.rwkv_use_learnable_states


def stated_model(seed: int):
    model = make_model(seed=seed, rwkv_use_learnable_states=True)
    with torch.no_grad():
        for p in model.learnable_state_parameters():
            p.normal_()
    return model


@pytest.mark.parametrize("fmt, ext", [("rwkv", "pth"), ("safetensors", "safetensors")])
def test_export_without_states_removes_an_earlier_exports_states(tmp_path, fmt, ext):
    """Before, the stateless export rewrote m.<ext> only, and every loader merged the earlier export's states
    into the new weights (logits off by up to 0.86)."""
    out = tmp_path / f"m.{ext}"
    assert len(export_checkpoint(stated_model(6), out, format=fmt, dtype="fp32")) == 2
    plain = make_model(seed=7)
    assert cli_main(["export", str(plain.save_pretrained(tmp_path / "plain")), "--format", fmt, "--dtype", "fp32",
                     "--output", str(out)]) == 0
    assert not states_path_for(out).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left behind
    loaded, meta = load_checkpoint(out)
    assert not loaded.config.rwkv_use_learnable_states and "states_file" not in meta
    assert torch.equal(logits(loaded, IDS), logits(plain, IDS))
    # A stateful export over it brings states back, its own.
    tuned = stated_model(8)
    export_checkpoint(tuned, out, format=fmt, dtype="fp32")
    assert torch.equal(logits(load_checkpoint(out)[0], IDS), logits(tuned, IDS))


def test_an_export_that_fails_to_write_leaves_the_earlier_export_whole(tmp_path):
    """The new weights are written in full under a temporary name before the earlier export's states go: a
    write that fails (here: a directory where that file would go) leaves the earlier pair as it was."""
    out, tuned = tmp_path / "m.pth", stated_model(6)
    export_checkpoint(tuned, out, format="rwkv", dtype="fp32")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / f".m.pth.{os.getpid()}.staged").mkdir()
    with pytest.raises(Exception):
        export_checkpoint(make_model(seed=7), out, format="rwkv", dtype="fp32")
    (tmp_path / f".m.pth.{os.getpid()}.staged").rmdir()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert torch.equal(logits(load_checkpoint(out)[0], IDS), logits(tuned, IDS))


def test_export_refuses_what_the_official_format_cannot_hold(tmp_path):
    hybrid = make_model(num_layers=3, attention_layers=[2])
    with pytest.raises(CheckpointError, match=r"attention blocks.*hybrid"):
        export_checkpoint(hybrid, tmp_path / "h.pth", format="rwkv")
    with pytest.raises(CheckpointError, match="position embeddings"):
        export_checkpoint(make_model(use_position_embeddings=True), tmp_path / "p.pth", format="rwkv")
    with pytest.raises(CheckpointError, match="head_size is 32"):
        export_checkpoint(make_model(head_size=32), tmp_path / "n.pth", format="rwkv")
    with pytest.raises(CheckpointError, match=r"must end in \.pth"):
        export_checkpoint(make_model(), tmp_path / "x.bin", format="rwkv")
    with pytest.raises(CheckpointError, match="dtype"):
        export_checkpoint(make_model(), tmp_path / "x.pth", format="rwkv", dtype="int4")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_export_cli_errors_are_one_line(tmp_path, capsys):
    ck = make_model(num_layers=2, attention_layers=[1]).save_pretrained(tmp_path / "hy")
    assert cli_main(["export", str(ck), "--output", str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert "hybrid" in err and len(err.splitlines()) == 1
    assert cli_main(["export", str(tmp_path / "missing"), "--output", str(tmp_path / "o.pth")]) == 2
    assert "no such file" in capsys.readouterr().err
    # Exporting over an existing file replaces it whole (tmp + os.replace).
    ok = make_model().save_pretrained(tmp_path / "ok")
    (tmp_path / "o.pth").write_text("old")
    assert cli_main(["export", str(ok), "--dtype", "fp16", "--output", str(tmp_path / "o.pth")]) == 0
    assert torch.load(tmp_path / "o.pth", weights_only=True)["head.weight"].dtype == torch.float16


class NotATensor:
    def __init__(self):
        self.x = 1


@pytest.mark.parametrize("case, pattern", [
    ("text", r"not a checkpoint; found a text file"),
    ("empty", r"empty file"),
    ("v6", r"RWKV-6 \(x060\) checkpoint \(found key 'blocks\.0\.att\.time_maa_x'\)"),
    ("v5", r"RWKV-5 \(x052\)"),
    ("v4", r"RWKV-4 checkpoint"),
    ("hf", r"not an RWKV-7 checkpoint.*Hugging Face"),
    ("truncated", r"truncated or corrupt"),
    ("code", r"refusing to load.*pickled Python objects"),
    ("nondict", r"expected a dict of tensors.*list"),
    ("missing_tensor", r"missing 1 tensors \(blocks\.1\.ffn\.key\.weight\)"),
    ("missing_block", r"blocks \[1\] are missing"),
    ("bad_safetensors", r"truncated or corrupt safetensors"),
    ("plain_dir", r"directory without config\.json"),
    ("newer_dir", r"newer than this kaggletrain"),
    ("nothing", r"no such file"),
])
def test_wrong_files_fail_clearly(tmp_path, case, pattern):
    p = tmp_path / "x.pth"
    good = make_model().state_dict()
    if case == "text":
        p.write_text("hello, this is a README\n")
    elif case == "empty":
        p.write_bytes(b"")
    elif case == "v6":
        torch.save({"emb.weight": torch.zeros(4, 4), "blocks.0.att.time_maa_x": torch.zeros(1, 1, 4),
                    "blocks.0.att.time_decay": torch.zeros(4)}, p)
    elif case == "v5":
        torch.save({"emb.weight": torch.zeros(4, 4), "blocks.0.att.time_mix_k": torch.zeros(1, 1, 4),
                    "blocks.0.att.time_faaaa": torch.zeros(1, 4)}, p)
    elif case == "v4":
        torch.save({"emb.weight": torch.zeros(4, 4), "blocks.0.att.time_first": torch.zeros(4)}, p)
    elif case == "hf":
        torch.save({"model.layers.0.attn.r_proj.weight": torch.zeros(4, 4)}, p)
    elif case == "truncated":
        torch.save(good, p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif case == "code":
        torch.save({"emb.weight": torch.zeros(2, 2), "obj": NotATensor()}, p)
    elif case == "nondict":
        torch.save([torch.zeros(2)], p)
    elif case == "missing_tensor":
        torch.save({k: v for k, v in good.items() if k != "blocks.1.ffn.key.weight"}, p)
    elif case == "missing_block":
        sd = {k.replace("blocks.1.", "blocks.2."): v for k, v in good.items()}
        torch.save(sd, p)
    elif case == "bad_safetensors":
        p = tmp_path / "x.safetensors"
        save_weights(make_model(), p)
        p.write_bytes(p.read_bytes()[:-100])
    elif case == "plain_dir":
        p = tmp_path / "d"
        p.mkdir()
        (p / "notes.txt").write_text("x")
    elif case == "newer_dir":
        p = make_model().save_pretrained(tmp_path / "ck")
        cfg = json.loads((p / "config.json").read_text())
        (p / "config.json").write_text(json.dumps({**cfg, "version": 99}))
    elif case == "nothing":
        p = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(p)


def test_zip_that_is_not_torch_is_reported(tmp_path):
    p = tmp_path / "a.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(CheckpointError, match=str(p)):
        load_checkpoint(p)


def test_run_directory_resolves_to_its_latest_checkpoint(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "run" / "checkpoints" / "step-00000010")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-00000010\n")
    loaded, meta = load_checkpoint(tmp_path / "run")
    assert meta["path"].endswith("step-00000010")
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_sniff_safetensors_whose_header_length_starts_with_pickle_marker(tmp_path):
    """A safetensors header length with low byte 0x80 must not be mistaken for a pickle."""
    from safetensors.torch import save_file

    from kaggletrain.interop.files import sniff

    for n in range(1, 300):
        p = tmp_path / f"w{n}.safetensors"
        save_file({"a" * n: torch.zeros(1)}, str(p))
        if p.read_bytes()[:1] == b"\x80":
            assert sniff(p) == "safetensors"
            return
    pytest.fail("no header length with low byte 0x80 was produced")
