"""Tiny random HuggingFace checkpoints, written by the tests themselves.

`make_checkpoint(dir, arch=...)` saves a model with ``save_pretrained`` (safetensors) plus a small byte-level BPE
tokenizer trained with ``tokenizers`` on a fixed corpus, a tokenizer_config.json with a chat template and a
generation_config.json. HF transformers is the reference implementation that reads the same directory.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
    "Continuous batching admits new requests while others decode.",
    "Prefix caching computes a shared system prompt once.",
    "naïve café — déjà vu, 東京, Straße, emoji 🎉🚀 and ünïcödé text.",
    "def f(x):\n    return x * 2  # a comment\n",
    '{"id": 1, "prompt": "hello world"}',
    "0123456789 + - * / = ( ) [ ] { } < > ! ? , . ; :",
]


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}


def make_checkpoint(
    path: str | Path,
    arch: str = "llama",
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    tie_word_embeddings: bool = False,
    rope_scaling: dict | None = None,
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
    seed: int = 0,
    init_std: float = 0.08,
    **extra,
) -> Path:
    """Write a random `arch` checkpoint to `path` and return it. `init_std` > HF's 0.02 keeps greedy argmax
    margins well above float32 rounding, so token-identity tests are meaningful rather than tie-breaking.
    `extra`: further config fields of the family (phi3: partial_rotary_factor, original_max_position_embeddings;
    qwen3_moe: num_experts, num_experts_per_tok, moe_intermediate_size, norm_topk_prob, mlp_only_layers,
    decoder_sparse_step; mixtral: num_local_experts, num_experts_per_tok; gemma3: sliding_window, layer_types or
    sliding_window_pattern, rope_local_base_freq, query_pre_attn_scalar, final_logit_softcapping). Gemma 3's norm
    weights w (it multiplies by 1 + w) are drawn around 0, the others around 1."""
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=0, initializer_range=init_std,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(head_dim=head_dim, rope_scaling=rope_scaling, **common)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(head_dim=head_dim, sliding_window=None, **common)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        assert hidden_size // num_heads == head_dim, "Qwen2 derives head_dim from hidden_size / heads"
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=head_dim, **common)
    elif arch == "phi3":
        assert hidden_size // num_heads == head_dim, "Phi-3 derives head_dim from hidden_size / heads"
        cfg = transformers.Phi3Config(rope_scaling=rope_scaling, pad_token_id=0, **common, **extra)
    elif arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(head_dim=head_dim, **common, **extra)
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(head_dim=head_dim, sliding_window=None, **common, **extra)
    elif arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(head_dim=head_dim, rope_scaling=rope_scaling, pad_token_id=0,
                                            **common, **extra)
        cfg.architectures = [ARCHS[arch]]
    else:
        raise ValueError(f"unknown test arch {arch!r}; use one of {sorted(ARCHS)}")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_((0.0 if arch == "gemma3" else 1.0) + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, init_std)
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
    (path / "tokenizer.json").write_text(_tokenizer_json(min(vocab_size, 512)))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2], "bos_token_id": 1}))
    return path
