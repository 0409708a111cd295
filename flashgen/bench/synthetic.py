"""Synthetic model directories for benchmarks: the published shapes, a byte-level tokenizer, no weights
(the engine loads them with load_format="dummy")."""
from __future__ import annotations

import json
from pathlib import Path

SHAPES = {
    "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=1024, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                       vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960,
                       rope_theta=1000000.0, rms_norm_eps=1e-6),
    "llama-3.1-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
                         vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936,
                          tie_word_embeddings=False, max_position_embeddings=40960, rope_theta=1000000.0,
                          rms_norm_eps=1e-6),
    "gemma3-4b": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=2560,
                      num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                      intermediate_size=10240, vocab_size=262208, tie_word_embeddings=True,
                      max_position_embeddings=131072, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                      rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=1024,
                      sliding_window_pattern=6, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
                      hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
                      attn_logit_softcapping=None),
    # not a published model: CPU smoke runs of the benchmarks (tests), the Qwen3 layer on a few small tensors
    "tiny": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=512,
                 tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=1000000.0, rms_norm_eps=1e-6),
}


def _byte_tokenizer() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def write_model_dir(shape: str, path: str | Path, dtype: str = "bfloat16") -> Path:
    if shape not in SHAPES:
        raise ValueError(f"model shape {shape!r} is unknown; use one of {', '.join(SHAPES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"hidden_act": "silu", **SHAPES[shape], "torch_dtype": dtype}))
    (path / "tokenizer.json").write_text(_byte_tokenizer())
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
    return path
