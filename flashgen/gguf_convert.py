"""Convert a llama, qwen2 or qwen3 GGUF file into a HuggingFace checkpoint directory.

flashgen only loads HF directories, but small models are often shipped as GGUF. This module reads a GGUF
with the `gguf` package, dequantizes every tensor (F32/F16/BF16, the legacy Q4_0..Q8_0 and the K-quants
Q2_K..Q6_K, whatever the installed `gguf` can dequantize) and writes what an HF checkpoint holds:

    config.json               Llama/Qwen2/Qwen3ForCausalLM, from the `<arch>.*` metadata
    model.safetensors         HF tensor names, in bfloat16 unless another dtype is asked for; llama's Q/K rows
                              put back in HF's rotary layout
    tokenizer.json            byte-level BPE built with `tokenizers` from the `tokenizer.ggml.*` metadata
    tokenizer_config.json     special tokens, chat template, add_bos_token
    generation_config.json    bos/eos/pad ids

Only `gguf`, `tokenizers`, `safetensors`, numpy and torch are needed at run time (no transformers).
The output is written to a temporary sibling directory and renamed into place, so a killed conversion
never leaves a half-written model directory behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from flashgen.models.errors import ModelLoadError
from flashgen.models.loader import expected_shapes
from flashgen.models.spec import ModelSpec, spec_from_config

__all__ = ["convert_gguf", "GGUFConversionError"]

# GGUF `general.architecture` -> (HF architecture, HF model_type). llama.cpp permutes the Q/K rows of llama only.
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
# What `--dtype` accepts: the dtype model.safetensors is written in (config.json's torch_dtype says the same).
OUTPUT_DTYPES = ("bfloat16", "float16", "float32")

# llama.cpp's `tokenizer.ggml.token_type` values (gguf.TokenType); spelled out so the intent reads here.
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

# How llama.cpp splits text before BPE, per `tokenizer.ggml.pre` (llama.cpp: llama-vocab.cpp). We only list the
# families whose split we can express exactly with `tokenizers` pre-tokenizers; an unknown name is an error,
# because a wrong split silently changes the token ids the model sees.
_GPT2_FAMILY = ("default", "gpt-2", "gpt2", "mpt", "olmo", "jais")
# StarCoder-style vocabularies (SmolLM among them) isolate every digit first, then apply the GPT-2 regex; the
# original HF tokenizer.json of these models says the same with Digits(individual_digits=True) + ByteLevel.
_DIGITS_FAMILY = ("smollm", "starcoder", "refact", "codeshell")
# Llama 3: its own split regex, and llama.cpp/HF both look a whole pre-token up in the vocabulary before merging.
_LLAMA3_FAMILY = ("llama3", "llama-v3", "llama-bpe", "falcon3")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_PRE_TOKENIZERS = _GPT2_FAMILY + _DIGITS_FAMILY + _LLAMA3_FAMILY


class GGUFConversionError(ValueError):
    """The GGUF file cannot be converted; the message names the file, the field and the value."""


# --------------------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------------------

_MISSING = object()


def _field(reader, key: str, path: Path, default: Any = _MISSING) -> Any:
    """One metadata value as a Python object (str, int, float, bool or a list of them).

    Read from the reader's raw `parts`/`data` rather than `ReaderField.contents()`, which older gguf releases lack.
    """
    from gguf import GGUFValueType

    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise GGUFConversionError(
                f"{path}: metadata field {key!r} is missing; the file is not a complete GGUF model"
            )
        return default
    kind = f.types[0]
    if kind == GGUFValueType.ARRAY:
        if f.types[-1] == GGUFValueType.STRING:
            return [f.parts[i].tobytes().decode("utf-8") for i in f.data]
        if not f.data:
            return []
        return np.concatenate([f.parts[i] for i in f.data]).tolist()
    if kind == GGUFValueType.STRING:
        return f.parts[f.data[0]].tobytes().decode("utf-8")
    return f.parts[f.data[0]][0].item()


def _as_float(x: float) -> float:
    # GGUF stores floats as float32: 1e-5 comes back as 9.999999747378752e-06. The shortest repr that
    # round-trips through float32 is the value the original config.json had.
    return float(str(np.float32(x)))


def _int_field(reader, key: str, path: Path, default: Any = _MISSING) -> Any:
    value = _field(reader, key, path, default)
    if isinstance(value, list):
        raise GGUFConversionError(
            f"{path}: metadata field {key!r} is a per-layer list {value[:4]}...; only models with the same value "
            "in every layer can be converted"
        )
    return value


def _architecture(reader, path: Path) -> str:
    arch = _field(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFConversionError(
            f"{path}: metadata field 'general.architecture' is {arch!r}; only {', '.join(SUPPORTED_ARCHITECTURES)} "
            "GGUF files can be converted (convert the original HF checkpoint instead)"
        )
    return arch


def _model_config(reader, path: Path, n_vocab: int, tied: bool, dtype: str = "float32") -> dict:
    """config.json for the HF class of the GGUF's architecture, from the `<arch>.*` metadata."""
    arch = _architecture(reader, path)
    k = lambda name: f"{arch}.{name}"  # noqa: E731
    hidden = _int_field(reader, k("embedding_length"), path)
    heads = _int_field(reader, k("attention.head_count"), path)
    kv_heads = _int_field(reader, k("attention.head_count_kv"), path, heads)
    head_dim = _int_field(reader, k("attention.key_length"), path, hidden // heads)
    rope_dim = _int_field(reader, k("rope.dimension_count"), path, head_dim)
    if rope_dim != head_dim:
        raise GGUFConversionError(
            f"{path}: metadata field {k('rope.dimension_count')!r} is {rope_dim}, but head_dim is {head_dim}; "
            f"partial rotary embeddings are not supported by {ARCHITECTURES[arch][0]}"
        )
    vocab = _int_field(reader, k("vocab_size"), path, n_vocab)
    cfg = {
        "architectures": [ARCHITECTURES[arch][0]],
        "model_type": ARCHITECTURES[arch][1],
        "hidden_size": hidden,
        "intermediate_size": _int_field(reader, k("feed_forward_length"), path),
        "num_hidden_layers": _int_field(reader, k("block_count"), path),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _as_float(_field(reader, k("attention.layer_norm_rms_epsilon"), path)),
        "rope_theta": _as_float(_field(reader, k("rope.freq_base"), path, 10000.0)),
        "rope_scaling": _rope_scaling(reader, path, arch),
        "max_position_embeddings": _int_field(reader, k("context_length"), path),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "attention_bias": arch == "qwen2",  # Qwen2 always has q/k/v biases (its HF config has no such key)
        "mlp_bias": False,
        # The dtype model.safetensors is written in; `dtype` is the transformers>=5 spelling of the same field.
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if arch != "llama":
        cfg["use_sliding_window"] = False
    for name in ("bos_token_id", "eos_token_id", "padding_token_id"):
        token_id = _field(reader, f"tokenizer.ggml.{name}", path, None)
        if token_id is not None:
            cfg["pad_token_id" if name == "padding_token_id" else name] = token_id
    return cfg


def _rope_scaling(reader, path: Path, arch: str) -> dict | None:
    kind = _field(reader, f"{arch}.rope.scaling.type", path, "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _as_float(_field(reader, f"{arch}.rope.scaling.factor", path))}
    raise GGUFConversionError(
        f"{path}: metadata field '{arch}.rope.scaling.type' is {kind!r}; only 'none' and 'linear' can be converted"
    )


# --------------------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------------------

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str, path: Path) -> str | None:
    """The HF name of a GGUF tensor; None for tensors HF recomputes itself."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] in ("weight", "bias"):
        if parts[2] == "attn_rot_embd":  # old files store RoPE's inverse frequencies; HF derives them from rope_theta
            return None
        if parts[2] in _LAYER_TENSORS:  # a bias the model has no place for is refused by _convert_tensors
            return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    if gguf_name == "rope_freqs.weight":
        raise GGUFConversionError(
            f"{path}: tensor 'rope_freqs.weight' holds Llama-3.1-style RoPE frequency scaling, which this converter "
            "cannot express in config.json; convert the original HF checkpoint instead"
        )
    raise GGUFConversionError(
        f"{path}: tensor {gguf_name!r} has no HF counterpart in the supported architectures (extra tensors are "
        "not supported); convert the original HF checkpoint instead"
    )


def _undo_rotary_permutation(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Put the rows of a GGUF Q or K projection back in HF order.

    HF's rotary embedding pairs dimension j with j + head_dim/2 ("rotate_half"); ggml pairs 2j with 2j+1. So
    llama.cpp's HF->GGUF conversion interleaves the two halves of every head's rows: GGUF row (h, j, k) is HF row
    (h, k, j) for j < head_dim/2, k in {0, 1}. Swapping those two axes back gives the HF layout. K has one
    block per KV head, not per query head.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor, path: Path) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(tensor.tensor_type)
    try:
        w = dequantize(tensor.data, qtype)
    except NotImplementedError:
        raise GGUFConversionError(
            f"{path}: tensor {tensor.name!r} has quantization type {qtype.name}, which the installed gguf package "
            "cannot dequantize; upgrade it (pip install -U gguf) or use a GGUF with another quantization"
        ) from None
    # dequantize() returns a view into the memory-mapped file for F32; copy so the file can be closed.
    return np.array(w, dtype=np.float32, copy=True)


def _convert_tensors(reader, path: Path, spec: ModelSpec, dtype: str = "float32") -> dict:
    """All weights as `dtype` torch tensors under their HF names, checked against the shapes `spec` implies.

    Each tensor is dequantized to float32 and cast right away, so at most one float32 tensor is held at a time."""
    import torch

    torch_dtype = getattr(torch, dtype)
    permute = spec.family in ("llama", "mistral")  # llama.cpp interleaves Q/K rows for llama only
    want = expected_shapes(spec)
    out = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, path)
        if name is None:
            continue
        w = _dequantize(tensor, path)
        if permute and name.endswith("q_proj.weight"):
            w = _undo_rotary_permutation(w, spec.num_heads)
        elif permute and name.endswith("k_proj.weight"):
            w = _undo_rotary_permutation(w, spec.num_kv_heads)
        if name not in want:
            raise GGUFConversionError(
                f"{path}: tensor {tensor.name!r} ({name}) is not expected for a {spec.architecture} model with "
                f"num_hidden_layers={spec.num_layers}"
            )
        if tuple(w.shape) != want[name]:
            raise GGUFConversionError(
                f"{path}: tensor {tensor.name!r} has shape {list(w.shape)}, expected {list(want[name])} from the "
                "metadata; the file is inconsistent"
            )
        out[name] = torch.from_numpy(w).to(torch_dtype)
    missing = sorted(set(want) - set(out))
    if missing:
        raise GGUFConversionError(f"{path}: tensors for {missing[:3]} ({len(missing)} in all) are missing")
    return out


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------

def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are spelled in."""
    from tokenizers import pre_tokenizers

    # ByteLevel.alphabet() gives the 256 characters but not which byte each stands for; rebuild the
    # well-known table: printable Latin-1 bytes stand for themselves, the rest map to U+0100 onwards.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    return table


def _tokenizer_metadata(reader, path: Path) -> dict:
    model = _field(reader, "tokenizer.ggml.model", path)
    if model != "gpt2":
        raise GGUFConversionError(
            f"{path}: metadata field 'tokenizer.ggml.model' is {model!r}; only 'gpt2' (byte-level BPE) tokenizers "
            "can be converted"
        )
    pre = _field(reader, "tokenizer.ggml.pre", path, "default")
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise GGUFConversionError(
            f"{path}: metadata field 'tokenizer.ggml.pre' is {pre!r}; supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)}"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    types = _field(reader, "tokenizer.ggml.token_type", path, [1] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFConversionError(
            f"{path}: metadata field 'tokenizer.ggml.token_type' has {len(types)} entries for {len(tokens)} tokens"
        )
    ids = lambda name: _field(reader, f"tokenizer.ggml.{name}", path, None)  # noqa: E731
    return {
        "pre": pre,
        "tokens": tokens,
        "types": types,
        "merges": _field(reader, "tokenizer.ggml.merges", path),
        "add_prefix_space": bool(_field(reader, "tokenizer.ggml.add_space_prefix", path, False)),
        "add_bos": bool(_field(reader, "tokenizer.ggml.add_bos_token", path, False)),
        "add_eos": bool(_field(reader, "tokenizer.ggml.add_eos_token", path, False)),
        "bos": ids("bos_token_id"), "eos": ids("eos_token_id"), "eot": ids("eot_token_id"),
        "unk": ids("unknown_token_id"), "pad": ids("padding_token_id"),
        "chat_template": _field(reader, "tokenizer.chat_template", path, None),
    }


def _vocab(meta: dict, path: Path) -> dict[str, int]:
    """token -> id, with every ordinary token spelled in the byte-level alphabet.

    llama.cpp writes ordinary byte-level tokens already spelled that way; a rare file has one in plain UTF-8,
    which we respell so BPE can find it. Control and user-defined tokens keep their text: they are matched whole
    in the input, never built by merges.
    """
    spell = _byte_alphabet()
    alphabet = set(spell.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(meta["tokens"], meta["types"], strict=True)):
        if kind not in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and not set(tok) <= alphabet:
            tok = "".join(spell[b] for b in tok.encode("utf-8"))
        if tok in vocab:
            raise GGUFConversionError(
                f"{path}: metadata field 'tokenizer.ggml.tokens' lists token {tok!r} twice (ids {vocab[tok]} and {i})"
            )
        vocab[tok] = i
    return vocab


def _pre_tokenizer(meta: dict):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=meta["add_prefix_space"], use_regex=True)
    if meta["pre"] in _DIGITS_FAMILY:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if meta["pre"] in _LLAMA3_FAMILY:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=meta["add_prefix_space"], use_regex=False),
        ])
    return byte_level


def _post_processor(meta: dict):
    from tokenizers import processors

    tokens = meta["tokens"]
    add = [meta[w] for w in ("bos", "eos") if meta[f"add_{w}"] and meta[w] is not None]
    if not add:
        # What HF uses for byte-level BPE without BOS; with trim_offsets=False it changes nothing.
        return processors.ByteLevel(trim_offsets=False)

    def sequence(piece: str, type_id: int) -> str:
        bos = [f"{tokens[meta['bos']]}:{type_id}"] if meta["add_bos"] and meta["bos"] is not None else []
        eos = [f"{tokens[meta['eos']]}:{type_id}"] if meta["add_eos"] and meta["eos"] is not None else []
        return " ".join([*bos, f"{piece}:{type_id}", *eos])

    return processors.TemplateProcessing(
        single=sequence("$A", 0),
        pair=f"{sequence('$A', 0)} {sequence('$B', 1)}",
        special_tokens=[(tokens[i], i) for i in add],
    )


def _build_tokenizer(meta: dict, path: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models

    merges = []
    for m in meta["merges"]:
        pair = m.split(" ")
        if len(pair) != 2:
            raise GGUFConversionError(f"{path}: metadata field 'tokenizer.ggml.merges' has malformed entry {m!r}")
        merges.append((pair[0], pair[1]))
    bpe = models.BPE(
        vocab=_vocab(meta, path), merges=merges, fuse_unk=False, byte_fallback=False,
        ignore_merges=meta["pre"] in _LLAMA3_FAMILY,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(meta)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(meta)
    # Control tokens (<|im_start|>...) must be matched whole, before the pre-tokenizer can cut them apart.
    special = [t for t, k in zip(meta["tokens"], meta["types"], strict=True) if k == TOKEN_CONTROL]
    user = [t for t, k in zip(meta["tokens"], meta["types"], strict=True) if k == TOKEN_USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    if tok.get_vocab_size(with_added_tokens=True) != len(meta["tokens"]):
        raise GGUFConversionError(
            f"{path}: the tokenizer built from 'tokenizer.ggml.tokens' has {tok.get_vocab_size(True)} tokens, "
            f"expected {len(meta['tokens'])}"
        )
    return tok


def _tokenizer_config(meta: dict, context_length: int) -> dict:
    tokens = meta["tokens"]
    name = lambda i: tokens[i] if i is not None else None  # noqa: E731
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(meta["bos"]),
        "eos_token": name(meta["eos"]),
        "unk_token": name(meta["unk"]),
        "pad_token": name(meta["pad"]),
        "add_bos_token": meta["add_bos"],
        "add_eos_token": meta["add_eos"],
        "add_prefix_space": meta["add_prefix_space"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    if meta["chat_template"]:
        cfg["chat_template"] = meta["chat_template"]
    return cfg


def _generation_config(meta: dict) -> dict:
    # A chat model's end-of-turn token (eot) stops generation just like eos.
    eos = sorted({i for i in (meta["eos"], meta["eot"]) if i is not None})
    cfg = {"bos_token_id": meta["bos"], "eos_token_id": eos[0] if len(eos) == 1 else (eos or None)}
    if meta["pad"] is not None:
        cfg["pad_token_id"] = meta["pad"]
    return {k: v for k, v in cfg.items() if v is not None}


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------

def _open(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFConversionError(
            f"{path}: converting a GGUF file needs the gguf package; install it with pip install gguf"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file not found")
    try:
        return GGUFReader(path, "r")
    except (ValueError, OSError) as e:
        raise GGUFConversionError(f"{path}: not a readable GGUF file ({e})") from None


def _write_dir(tmp: Path, reader, path: Path, dtype: str) -> None:
    from safetensors.torch import save_file

    _architecture(reader, path)  # first: an unsupported model should not be blamed on its tokenizer
    meta = _tokenizer_metadata(reader, path)
    tied = all(t.name != "output.weight" for t in reader.tensors)
    cfg = _model_config(reader, path, len(meta["tokens"]), tied, dtype)
    try:  # the config flashgen will load: a model it would refuse is refused here, naming the GGUF
        spec = spec_from_config(cfg, path)
    except ModelLoadError as e:
        raise GGUFConversionError(str(e)) from None
    tokenizer = _build_tokenizer(meta, path)  # before the weights: a tokenizer problem fails fast
    tensors = _convert_tensors(reader, path, spec, dtype)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(tmp / "tokenizer.json"))
    dump = lambda name, obj: (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")  # noqa: E731
    dump("config.json", cfg)
    dump("tokenizer_config.json", _tokenizer_config(meta, cfg["max_position_embeddings"]))
    dump("generation_config.json", _generation_config(meta))


def _apply_umask(directory: Path) -> None:
    """Give the finished directory ordinary permissions: mkdtemp makes it private (0700), and a model in a
    shared cache must be readable by whoever may read the cache."""
    mask = os.umask(0)  # the only portable way to read the umask is to set it; put it straight back
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~mask)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Dequantize a llama, qwen2 or qwen3 GGUF into an HF checkpoint directory `out_dir`; returns its path.

    `dtype` (one of OUTPUT_DTYPES) is what model.safetensors holds. This function keeps float32 as its default,
    because the cached default model (`resolve_model`) is converted through it and compared exactly against
    transformers; the `flashgen convert-gguf` command defaults to bfloat16 (half the size of float32).
    `out_dir` must not exist yet (or be empty). Raises GGUFConversionError naming the file, the metadata field
    or tensor and its value when the file uses something this converter does not support. All weights are held
    in memory in `dtype` before they are written (0.5 GB in float32 for the default 135M model).
    """
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {', '.join(OUTPUT_DTYPES)}")
    path = Path(gguf_path)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty; remove it or choose another output directory")
    reader = _open(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so the final rename is atomic and never crosses file systems.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_dir(tmp, reader, path, dtype)
        _apply_umask(tmp)
        if out.is_dir():
            out.rmdir()  # empty, checked above
        try:
            os.rename(tmp, out)
        except OSError as e:
            if out.exists():  # a concurrent conversion into the same place finished first
                raise FileExistsError(f"{out}: appeared while converting; another conversion got there first") from e
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
