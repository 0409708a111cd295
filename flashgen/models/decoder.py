"""The decoder-only transformer shared by Llama, Mistral, Qwen2, Qwen3, Phi-3 / Phi-4, Qwen3-MoE, Mixtral and
Gemma 3.

The families differ only in flags of ModelSpec (q/k/v bias, per-head q/k RMSNorm, rope scaling, partial rotary,
mixture-of-experts MLPs through ops.moe; Gemma 3's norms, GeLU-tanh MLP and sliding-window layers, see
flashgen/models/gemma3.py), so one model class runs them all. Attention, the fused elementwise
steps and the linear layers go through `ops` (torch reference or CUDA kernels); GEMMs stay in torch (cuBLAS /
MKL) except a few rows, where the CUDA backend may use its skinny kernel. FP8 projection weights (a float32
scale per output row) run through ops.linear_fp8.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from types import ModuleType

import torch
import torch.nn.functional as F

from flashgen.models.loader import (
    FUSED_FP8,
    dummy_weights,
    expected_shapes,
    fuse_layer_weights,
    load_kv_scales,
    load_weights,
    norm_weight,
    quantize_fp8_layer,
)
from flashgen.models.spec import ModelSpec, rope_cos_sin
from flashgen.models.tensor_parallel import TPInfo, all_reduce, gather_logits, shard_layer, shard_vocab
from flashgen.ops.backend import Fp8Rows, SharedPrefix


@dataclass
class StepContext:
    """Per-step attention metadata, filled by the ModelRunner (shapes on each field)."""
    is_prefill: bool
    positions: torch.Tensor          # (T,) int32, position of each token in its sequence
    slot_mapping: torch.Tensor       # (T,) int32, cache slot of each token (block * block_size + offset)
    context_lens: torch.Tensor       # (B,) int32, tokens in the cache after this step, per sequence
    block_tables: torch.Tensor       # (B, max_blocks) int32
    cu_seqlens_q: torch.Tensor | None = None   # (B + 1,) int32, prefill only
    max_seqlen_q: int = 1
    shared: SharedPrefix | None = None  # decode only: groups of sequences sharing leading blocks
    longest: int | None = None  # decode only: the most tokens one sequence attends to past its group's shared
    #                             blocks (None: unknown); the CUDA backend picks its decode plan by it


class DecoderLM:
    def __init__(self, model_dir: str, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                 ops: ModuleType, max_positions: int, load_format: str = "auto", tp: TPInfo | None = None,
                 kv_dtype: torch.dtype | None = None, quantization: str = "auto"):
        self.spec, self.dtype, self.device, self.ops = spec, dtype, device, ops
        # the KV cache's dtype: the model's, or float8_e4m3fn with a float32 scale per layer for K and for V
        # (docs/design.md, "FP8 KV cache"): from the checkpoint when it has them, else set by calibrate_kv_scales;
        # or torch.int8, the int8k cache (int8 K, e4m3 V), whose scales are tensors beside the cache, a float32 per
        # token and kv head (bind_kv_cache)
        self.kv_dtype = kv_dtype or dtype
        self.k_scales: list[float | torch.Tensor] = [1.0] * spec.num_layers
        self.v_scales: list[float | torch.Tensor] = [1.0] * spec.num_layers
        self.kv_scales_from = "per token" if self.kv_dtype == torch.int8 else "default"
        self.tp = tp if tp is not None and tp.world > 1 else None
        if self.tp:
            self.tp.check(spec)
        if load_format == "dummy":
            # NOTE: made on each rank's own GPU from one seed: every rank (and a one-GPU run) sees the same values
            w = dummy_weights(spec, dtype, device)
        else:
            # NOTE: with tensor parallelism each rank reads the full tensors on the CPU and keeps its slice
            w = load_weights(model_dir, spec, dtype, "cpu" if self.tp else device)
            if self.kv_dtype == torch.float8_e4m3fn:
                scales = load_kv_scales(model_dir, spec)
                if scales is not None:
                    self.k_scales, self.v_scales = list(scales[0]), list(scales[1])
                    self.kv_scales_from = "checkpoint"
        # FP8 projection weights: the checkpoint's ("checkpoint"), quantized at load ("quantized"), or none ("")
        self.weights_fp8 = ""
        self._set_weights(w, quantize=quantization == "fp8")
        self.cos_sin = rope_cos_sin(spec, max_positions, device)
        # Gemma 3's local (sliding-window) layers rotate with their own base, without scaling
        self.cos_sin_local = (rope_cos_sin(replace(spec, rope_theta=spec.local_rope_theta, rope_scaling=None),
                                           max_positions, device) if spec.local_layers else self.cos_sin)
        self.scale = spec.softmax_scale
        self.k_caches: list[torch.Tensor] = []
        self.v_caches: list[torch.Tensor] = []

    @property
    def num_kv_heads_local(self) -> int:
        return self.tp.kv_heads(self.spec)[1] if self.tp else self.spec.num_kv_heads

    def _set_weights(self, w: dict[str, torch.Tensor], quantize: bool = False) -> None:
        """Fuse, quantize (`quantize`: the float projections to FP8, before sharding, so every rank's slice has the
        scales one GPU would), shard and place the weights."""
        spec, tp, dev = self.spec, self.tp, self.device
        self.embed = w.pop("model.embed_tokens.weight").to(dev)
        self.final_norm = norm_weight(w.pop("model.norm.weight"), spec).to(dev)
        lm_head = self.embed if spec.tie_word_embeddings else w.pop("lm_head.weight")
        self.lm_head = shard_vocab(lm_head, tp).to(dev) if tp else lm_head.to(dev)
        self.layers = []
        for i in range(spec.num_layers):
            L = fuse_layer_weights(w, spec, i)
            if any(L[k + "_scale"] is not None for k in FUSED_FP8):
                self.weights_fp8 = self.weights_fp8 or "checkpoint"
            if quantize:
                L = quantize_fp8_layer(L)
                self.weights_fp8 = self.weights_fp8 or "quantized"
            if tp:
                L = shard_layer(L, spec, tp)
            self.layers.append({k: (v.to(dev) if v is not None else None) for k, v in L.items()})

    @torch.inference_mode()
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Overwrite the weights in place (captured CUDA graphs keep pointing at them) with a HF model's state
        dict of the same shapes, e.g. to compare with HF on equal weights."""
        old = (self.embed, self.final_norm, self.lm_head, self.layers)
        # NOTE: FP8 layers stay FP8: the new weights are quantized as --quantization fp8 would
        self._set_weights({k: sd[k].to(self.dtype) for k in expected_shapes(self.spec)},
                          quantize=bool(self.weights_fp8))
        new = (self.embed, self.final_norm, self.lm_head, self.layers)
        for o, n in zip(old[:3], new[:3], strict=True):
            o.copy_(n)
        for lo, ln in zip(old[3], new[3], strict=True):
            for k, v in ln.items():
                if v is not None:
                    dst = lo[k]
                    assert dst is not None, k  # the same spec: the same optional weights
                    dst.copy_(v)
        self.embed, self.final_norm, self.lm_head, self.layers = old

    def bind_kv_cache(self, kv: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        """kv: (2, num_layers, num_blocks, block_size, kv_heads, head_dim), allocated once by the runner
        (kv_plan.alloc_kv_cache). The int8k cache (kv int8): V is the same bytes read as float8_e4m3fn, and
        `scales` (2, num_layers, num_blocks, block_size, kv_heads) float32 holds K's and V's per-token scales."""
        if kv.dtype == torch.int8:
            if scales is None:
                raise ValueError("the int8k KV cache needs its per-token scales")
            self.k_caches, self.v_caches = list(kv[0]), list(kv[1].view(torch.float8_e4m3fn))
            self.k_scales, self.v_scales = list(scales[0]), list(scales[1])
        else:
            self.k_caches, self.v_caches = list(kv[0]), list(kv[1])

    def unbind_kv_cache(self) -> None:
        """Drop the references to a scratch cache (and an int8k cache's scales) so that its memory can be freed."""
        self.k_caches, self.v_caches = [], []
        if self.kv_dtype == torch.int8:
            self.k_scales = [1.0] * self.spec.num_layers
            self.v_scales = [1.0] * self.spec.num_layers

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (T,) -> (hidden, residual), each (T, hidden_size), final norm not yet applied."""
        ops, spec = self.ops, self.spec
        T = input_ids.shape[0]
        h = F.embedding(input_ids, self.embed)
        if spec.embed_scale != 1.0:  # Gemma: sqrt(hidden_size), cast to the model dtype first as HF does
            h = h * torch.tensor(spec.embed_scale, dtype=torch.float32).to(h.dtype)
        residual = None
        for i, L in enumerate(self.layers):
            if residual is None:
                x, residual = self._norm(h, L["input_norm"], None, L, "qkv"), h
            else:
                x, residual = self._norm(h, L["input_norm"], residual, L, "qkv")
            qkv = self._linear(x, L, "qkv", L["qkv_bias"])  # (T, (Hq + 2 Hkv) * D)
            ks, vs = self.k_scales[i], self.v_scales[i]
            window = spec.layer_window(i)
            win = {"window": window} if window else {}  # a local layer of Gemma 3: keys in (p - window, p]
            q = ops.rope_kv_append(qkv, ctx.positions, self.cos_sin_local if window else self.cos_sin,
                                   ctx.slot_mapping, self.k_caches[i],
                                   self.v_caches[i], L["q_norm"], L["k_norm"], spec.rms_norm_eps, k_scale=ks,
                                   v_scale=vs)
            if ctx.is_prefill:
                o = ops.prefill_attention(q, self.k_caches[i], self.v_caches[i], ctx.cu_seqlens_q,
                                          ctx.context_lens, ctx.block_tables, ctx.max_seqlen_q, self.scale,
                                          k_scale=ks, v_scale=vs, **win)
            else:
                o = ops.decode_attention(q, self.k_caches[i], self.v_caches[i], ctx.context_lens,
                                         ctx.block_tables, self.scale, k_scale=ks, v_scale=vs,
                                         shared=ctx.shared, longest=ctx.longest, **win)
            h = self._linear(o.reshape(T, -1), L, "o")
            if self.tp:
                h = all_reduce(h)
            moe = L.get("router") is not None  # a MoE layer (flashgen/models/moe.py)
            mlp_in = None if moe else "gate_up"
            if spec.sandwich_norm:  # Gemma 3: post-attention norm on the output, then the pre-feedforward norm
                h = ops.rms_norm(h, L["post_norm"], spec.rms_norm_eps)
                x, residual = self._norm(h, L["pre_ff_norm"], residual, L, mlp_in)
            else:
                x, residual = self._norm(h, L["post_norm"], residual, L, mlp_in)
            if moe:
                assert spec.moe is not None
                h = ops.moe(x, L["router"], L["experts_gate_up"], L["experts_down"], spec.moe.top_k,
                            spec.moe.renormalize)
            else:
                act = "gelu_tanh" if spec.hidden_act == "gelu_tanh" else "silu"
                gate_up = self._linear(x, L, "gate_up")
                if L["down_scale"] is not None:  # FP8: the activation's output quantized in the same kernel
                    h = self._linear(ops.act_mul_fp8(gate_up, act), L, "down")
                else:
                    h = self._linear(ops.gelu_tanh_mul(gate_up) if act == "gelu_tanh" else ops.silu_mul(gate_up),
                                     L, "down")
            if self.tp:
                h = all_reduce(h)
            if spec.sandwich_norm:
                h = ops.rms_norm(h, L["post_ff_norm"], spec.rms_norm_eps)
        assert residual is not None, "a model has layers"
        return h, residual

    def _norm(self, h: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None, L: dict,
              feeds: str | None):
        """RMSNorm of the rows layer weight `feeds` takes next (None: no linear layer), fused with the residual add
        when `residual` is given. Where that weight is FP8 the rows come quantized for it (Fp8Rows) from the same
        kernel: the bytes linear_fp8 would make of the norm's output, which is never written in the model's dtype."""
        assert weight is not None, "a norm has its weight"
        eps = self.spec.rms_norm_eps
        if feeds is not None and L[feeds + "_scale"] is not None:
            return self.ops.rms_norm_fp8(h, weight, eps, residual)
        return self.ops.rms_norm(h, weight, eps, residual)

    def _linear(self, x: torch.Tensor | Fp8Rows, L: dict, name: str, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Layer weight `name` applied to x: ops.linear, or ops.linear_fp8 where the weight is FP8 (linear_fp8_rows
        when the rows come quantized: _norm, act_mul_fp8)."""
        scale = L[name + "_scale"]
        if isinstance(x, Fp8Rows):
            return self.ops.linear_fp8_rows(x, L[name], scale, bias)
        if scale is None:
            return self.ops.linear(x, L[name], bias)
        return self.ops.linear_fp8(x, L[name], scale, bias)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Rows of (hidden, residual) -> (rows, vocab) logits in the model's dtype (the lm_head GEMM's output,
        as HF computes them), final norm fused with the last add. The fused sampler reads them as they are;
        penalties and filters work on a float32 copy."""
        x, _ = self.ops.rms_norm(hidden, self.final_norm, self.spec.rms_norm_eps, residual)
        logits = self.ops.linear(x, self.lm_head)
        if self.tp:
            logits = gather_logits(logits, self.spec.vocab_size, self.tp.world)
        cap = self.spec.final_logit_softcapping
        if cap:  # Gemma: cap * tanh(logits / cap), in the logits' dtype as HF
            logits = torch.tanh(logits / cap) * cap
        return logits
