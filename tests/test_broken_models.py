"""Broken model files: every load failure names the file, says what is wrong and the fix, and exits 2 before any
output is written (the line contract's "broken models" class).

Each case copies the tiny checkpoint, breaks one file and runs `flashgen generate` on it through the CLI.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_cli_support import gen, tiny_model

ST = "model.safetensors"


# -- ways to break a checkpoint: each takes the model directory ------------------------------------------------

def _edit_json(name: str, edit):
    def apply(d: Path):
        p = d / name
        cfg = json.loads(p.read_text())
        edit(cfg)  # in place
        p.write_text(json.dumps(cfg))
    return apply


def _write(name: str, data: bytes | str):
    def apply(d: Path):
        p = d / name
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return apply


def _set(key, value):
    return lambda cfg: cfg.__setitem__(key, value)


def _truncate(d: Path):
    p = d / ST
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])


def _garbage_header(d: Path):
    p = d / ST
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    p.write_bytes(raw[:8] + b"\x00\xff" * (n // 2) + b"\x00" * (n % 2) + raw[8 + n:])


def _edit_tensors(edit):
    def apply(d: Path):
        w = load_file(str(d / ST))
        edit(w)
        save_file(w, str(d / ST), metadata={"format": "pt"})
    return apply


def _shard(d: Path) -> dict:
    """Split model.safetensors into two shards with an index, as big checkpoints come."""
    w = load_file(str(d / ST))
    names = sorted(w)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for f, ns in parts.items():
        save_file({n: w[n] for n in ns}, str(d / f), metadata={"format": "pt"})
    (d / ST).unlink()
    index = {"metadata": {}, "weight_map": {n: f for f, ns in parts.items() for n in ns}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def _missing_shard(d: Path):
    _shard(d)
    (d / "model-00002-of-00002.safetensors").unlink()


def _index_not_json(d: Path):
    _shard(d)
    (d / "model.safetensors.index.json").write_text('{"weight_map": {')


def _index_without_map(d: Path):
    _shard(d)
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')


def _truncated_shard(d: Path):
    _shard(d)
    p = d / "model-00001-of-00002.safetensors"
    p.write_bytes(p.read_bytes()[:-100])


def _index_lies(d: Path):
    index = _shard(d)
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    other = [f for f in index["weight_map"].values() if f != "model-00001-of-00002.safetensors"]
    assert other  # model.norm.weight sits in the second shard: the index now points at the wrong one
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _nan(w):
    w["model.layers.0.mlp.down_proj.weight"][3, 5] = float("nan")


def _inf(w):
    w["lm_head.weight"][0, 0] = float("inf")


# (case id, how to break the checkpoint, the file the message must name, words the message must contain)
CASES = [
    # config.json
    ("config-not-json", _write("config.json", '{"hidden_size": 64,'), "config.json", "not valid JSON"),
    ("config-a-list", _write("config.json", "[1, 2, 3]"), "config.json", "holds a JSON list, not an object"),
    ("config-empty", _write("config.json", ""), "config.json", "not valid JSON"),
    ("config-missing-hidden_size", _edit_json("config.json", lambda c: c.pop("hidden_size")), "config.json",
     "'hidden_size' is missing"),
    ("config-hidden_size-string", _edit_json("config.json", _set("hidden_size", "64")), "config.json",
     "hidden_size='64' must be a positive integer"),
    ("config-negative-layers", _edit_json("config.json", _set("num_hidden_layers", -1)), "config.json",
     "num_hidden_layers=-1 must be a positive integer"),
    ("config-zero-vocab", _edit_json("config.json", _set("vocab_size", 0)), "config.json", "vocab_size=0"),
    ("config-zero-heads", _edit_json("config.json", _set("num_attention_heads", 0)), "config.json",
     "num_attention_heads=0"),
    ("config-bool-kv-heads", _edit_json("config.json", _set("num_key_value_heads", True)), "config.json",
     "num_key_value_heads=True"),
    ("config-negative-intermediate", _edit_json("config.json", _set("intermediate_size", -128)), "config.json",
     "intermediate_size=-128"),
    ("config-negative-head_dim", _edit_json("config.json", _set("head_dim", -32)), "config.json", "head_dim=-32"),
    ("config-odd-head_dim", _edit_json("config.json", _set("head_dim", 33)), "config.json", "head_dim=33 is not even"),
    ("config-heads-not-multiple", _edit_json("config.json", _set("num_key_value_heads", 3)), "config.json",
     "not a multiple of num_key_value_heads=3"),
    ("config-architectures-string", _edit_json("config.json", _set("architectures", "LlamaForCausalLM")),
     "config.json", "must be a list"),
    ("config-rope_scaling-string",
     _edit_json("config.json", lambda c: c.update(rope_scaling="yes", rope_parameters=None)), "config.json",
     "rope_scaling='yes' must be an object"),
    ("config-rope_parameters-list", _edit_json("config.json", _set("rope_parameters", [1])), "config.json",
     "rope_parameters=[1] must be an object"),
    ("config-llama3-rope-without-factor",
     _edit_json("config.json", _set("rope_parameters", {"rope_theta": 1e4, "rope_type": "llama3"})),
     "config.json", "rope_parameters.factor=None"),
    ("config-rope_theta-negative", _edit_json("config.json", _set("rope_parameters", {"rope_theta": -1.0})),
     "config.json", "rope_theta=-1.0"),
    ("config-rms_norm_eps-string", _edit_json("config.json", _set("rms_norm_eps", "1e-6")), "config.json",
     "rms_norm_eps='1e-6'"),
    ("config-max_position_embeddings-negative", _edit_json("config.json", _set("max_position_embeddings", -5)),
     "config.json", "max_position_embeddings=-5"),
    ("config-vocab-does-not-match-weights", _edit_json("config.json", _set("vocab_size", 1000)), ST,
     "has shape [512, 64], expected [1000, 64]"),
    # model.safetensors
    ("safetensors-empty", _write(ST, b""), ST, "empty (0 bytes)"),
    ("safetensors-tiny", _write(ST, b"\x01\x02\x03"), ST, "truncated"),
    ("safetensors-truncated", _truncate, ST, "truncated (the header says"),
    ("safetensors-trailing-bytes", lambda d: (d / ST).write_bytes((d / ST).read_bytes() + b"junk"), ST,
     "4 bytes longer than its header says"),
    ("safetensors-garbage", _write(ST, b"<!DOCTYPE html><html>not a model</html>" * 10), ST,
     "not a safetensors file"),
    ("safetensors-garbage-header", _garbage_header, ST, "header is garbage"),
    ("safetensors-header-a-list", _write(ST, struct.pack("<Q", 2) + b"[]"), ST, "header is garbage"),
    ("safetensors-lfs-pointer", _write(ST, "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n"),
     ST, "Git LFS pointer"),
    ("safetensors-int-dtype", _edit_tensors(lambda w: w.__setitem__(
        "model.norm.weight", w["model.norm.weight"].to(torch.int32))), ST, "'model.norm.weight' has dtype I32"),
    ("safetensors-missing-tensor", _edit_tensors(lambda w: w.pop("model.layers.0.self_attn.k_proj.weight")), ST,
     "'model.layers.0.self_attn.k_proj.weight' is missing"),
    ("safetensors-missing-file", lambda d: (d / ST).unlink(), "model.safetensors.index.json", "found"),
    ("shard-missing", _missing_shard, "model-00002-of-00002.safetensors", "listed in model.safetensors.index.json"),
    ("shard-truncated", _truncated_shard, "model-00001-of-00002.safetensors", "truncated"),
    ("index-not-json", _index_not_json, "model.safetensors.index.json", "not valid JSON"),
    ("index-without-weight_map", _index_without_map, "model.safetensors.index.json", "'weight_map'"),
    ("index-points-at-the-wrong-shard", _index_lies, "model-00001-of-00002.safetensors",
     "'model.norm.weight' is listed for this file"),
    # weights
    ("weights-nan", _edit_tensors(_nan), ST, "'model.layers.0.mlp.down_proj.weight' holds NaN or infinite"),
    ("weights-inf", _edit_tensors(_inf), ST, "'lm_head.weight' holds NaN or infinite"),
    # generation_config.json
    ("generation_config-not-json", _write("generation_config.json", "eos_token_id = 0"), "generation_config.json",
     "not valid JSON"),
    ("generation_config-a-list", _write("generation_config.json", "[0, 2]"), "generation_config.json", "JSON list"),
    ("generation_config-eos-string", _edit_json("generation_config.json", _set("eos_token_id", "</s>")),
     "generation_config.json", "eos_token_id='</s>'"),
    ("generation_config-binary", _write("generation_config.json", b"\xff\xfe\x00garbage"), "generation_config.json",
     "not valid JSON"),
    # tokenizer
    ("tokenizer-missing", lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json", "not found"),
    ("tokenizer-garbage", _write("tokenizer.json", "this is not a tokenizer"), "tokenizer.json",
     "not a valid tokenizer.json"),
    ("tokenizer-truncated", lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text()[:500]),
     "tokenizer.json", "not a valid tokenizer.json"),
    ("tokenizer-wrong-object", _write("tokenizer.json", '{"model": {"type": "Nope"}}'), "tokenizer.json",
     "not a valid tokenizer.json"),
    ("tokenizer_config-not-json", _write("tokenizer_config.json", "{'eos_token': 'x'}"), "tokenizer_config.json",
     "not valid JSON"),
    ("tokenizer_config-a-string", _write("tokenizer_config.json", '"hello"'), "tokenizer_config.json",
     "holds a JSON string"),
    ("tokenizer_config-eos-number", _edit_json("tokenizer_config.json", _set("eos_token", 5)),
     "tokenizer_config.json", "eos_token=5"),
    ("tokenizer_config-template-number", _edit_json("tokenizer_config.json", _set("chat_template", 7)),
     "tokenizer_config.json", "chat_template must be"),
]


@pytest.fixture
def model_copy(tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny_model(), d)
    return d


@pytest.mark.parametrize("case,breaks,file,words", CASES, ids=[c[0] for c in CASES])
def test_broken_model_is_fatal_and_named(tmp_path, model_copy, case, breaks, file, words):
    breaks(model_copy)
    r, records = gen(tmp_path, [{"prompt": "hello"}, {"prompt": "world"}], model=str(model_copy))
    err = r.stderr
    assert r.exit_code == 2, (r.exit_code, err)
    assert records == [], records
    assert "Traceback" not in err, err
    assert "flashgen: error: cannot load model" in err, err
    assert file in err, err
    assert words in err, err
    # the message is the error's own: no exception type name in front of it
    assert "ModelLoadError" not in err and "ModelFileMissing" not in err, err
    # and it says what to do
    line = next(x for x in err.splitlines() if "flashgen: error:" in x)
    assert "; " in line.split(file, 1)[-1] or "download" in line, line


def test_an_intact_copy_still_runs(tmp_path, model_copy):
    r, records = gen(tmp_path, [{"prompt": "hello"}], model=str(model_copy))
    assert r.exit_code == 0, r.stderr
    assert len(records) == 1 and records[0].get("text"), records


def test_a_sharded_copy_still_runs(tmp_path, model_copy):
    _shard(model_copy)
    r, records = gen(tmp_path, [{"prompt": "hello"}], model=str(model_copy))
    assert r.exit_code == 0, r.stderr
    assert len(records) == 1, records


def test_integral_float_sizes_are_accepted(tmp_path, model_copy):
    _edit_json("config.json", _set("max_position_embeddings", 2048.0))(model_copy)
    r, records = gen(tmp_path, [{"prompt": "hello"}], model=str(model_copy))
    assert r.exit_code == 0, r.stderr


def test_error_types_for_the_python_api(model_copy):
    from flashgen.models.errors import ModelFileMissing, ModelLoadError
    from flashgen.models.spec import load_spec

    _edit_json("config.json", _set("num_hidden_layers", -2))(model_copy)
    with pytest.raises(ModelLoadError, match=r"config\.json: num_hidden_layers=-2 must be a positive integer; "):
        load_spec(model_copy)
    with pytest.raises(ValueError):  # still a ValueError for callers that catch those
        load_spec(model_copy)
    (model_copy / "config.json").unlink()
    with pytest.raises(ModelFileMissing) as e:
        load_spec(model_copy)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)


def test_nan_check_names_a_value_that_overflows_only_in_the_load_dtype(tmp_path, model_copy):
    # 1e6 is a fine float32 weight but inf in float16: the message says so and how to load it instead
    _edit_tensors(lambda w: w["model.norm.weight"].__setitem__(0, 1e6))(model_copy)
    from flashgen.models.errors import ModelLoadError
    from flashgen.models.loader import load_weights
    from flashgen.models.spec import load_spec

    spec = load_spec(model_copy)
    with pytest.raises(ModelLoadError, match=r"'model\.norm\.weight' holds NaN or infinite values once cast to "
                                             r"float16.*dtype=float32"):
        load_weights(model_copy, spec, torch.float16, "cpu")
    assert load_weights(model_copy, spec, torch.float32, "cpu")["model.norm.weight"][0] == 1e6
