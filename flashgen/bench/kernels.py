"""Kernel benchmark: flashgen's CUDA kernels against the ceilings and peers measured in the same run.

    PYTHONPATH=. python -m flashgen.bench.kernels [OUT_DIR] [--only STEP[,STEP...]]

(STEP: decode, decode_ragged, prefill, elementwise, linear_fp8, moe_layer; all by default; the ceilings always)

Ceilings: device-to-device copy bandwidth (bytes read + written) and a bf16 8192^3 matmul. Decode
attention (GQA 32/8, d=128, bf16, paged, block sizes 16 and 64) as K+V bytes / time next to torch SDPA's
FLASH and CUDNN backends on contiguous KV of the same shape; prefill (causal, bf16, 16 heads, d=128, 16k
tokens) as TFLOP/s next to the same two backends (the kernel the engine picks, and on Hopper also the portable
mma.sync kernel on the same data); rope_kv_append, rms_norm, silu_mul and gelu_tanh_mul as GB/s against
the copy ceiling; linear layers with FP8 weights at one row (decode, batch 1) on the Llama-3.1-8B shapes, the FP8
skinny kernel (each variant) next to cuBLASLt's FP8 GEMM (torch._scaled_mm), as weight bytes / time against the
copy ceiling; a MoE layer (Qwen3-30B-A3B's shape) per decode batch size, the per-expert loop against the grouped
GEMMs, next to the time the bytes of the experts it activates take at HBM peak. CUDA-event timing, median of many
repetitions after warm-up, inputs rotated where one set would fit in L2. Prints a short table last; writes every
figure to OUT_DIR/kernels.json.
"""
from __future__ import annotations

import datetime
import json
import math
import operator
import sys
from pathlib import Path
from typing import Any

import torch

from flashgen.ops.timing import bench, fixed, rotating

L2_BYTES = 50 * 2**20
# (batch, context); B256 L256: a full batch of short contexts, where a job's lines are early in their output (the
# synth job's) or past a shared prefix (the extract job's own parts)
DEC_SHAPES = [(64, 1024), (64, 4096), (16, 16384), (1, 32768), (256, 256)]
# (batch, shortest, longest, spread): "random" draws the lengths between the two, seeded; "one long" is one
# longest sequence among shortest ones (the end of a long-tailed job); B256 50-350: the extract job's own parts
DEC_RAGGED = [(64, 64, 8192, "random"), (16, 512, 32768, "one long"), (256, 50, 350, "random")]
PREFILL_LENS = [512, 2048, 8192]
PREFILL_TOKENS = 16384
MOE_SHAPE = (128, 8, 2048, 768)   # Qwen3-30B-A3B's MoE layer: experts, top_k, hidden, expert width
MOE_BATCHES = (1, 8, 64, 256)     # decode batch sizes (tokens per step)
HBM_PEAK = 3.35e12                # bytes/s: H100 SXM's HBM3 peak, the MoE floor's bandwidth
# Llama-3.1-8B's linear layers (N, K): hidden 4096, 32 / 8 heads of 128, intermediate 14336; the model runs q, k, v
# as one fused qkv and gate, up as one gate_up (FUSED_8B: one layer's weights); 32 layers
LINEAR_8B = {"q": (4096, 4096), "k/v": (1024, 4096), "qkv": (6144, 4096), "o": (4096, 4096),
             "gate_up": (28672, 4096), "down": (4096, 14336)}
FUSED_8B, LAYERS_8B = ("qkv", "o", "gate_up", "down"), 32


def _sets(bytes_one: int) -> int:
    """How many input sets to rotate so that repeated calls cannot be served from L2."""
    return max(1, math.ceil(2 * L2_BYTES / max(1, bytes_one)))


def ceilings(dev) -> dict:
    n = 2**30  # 1 GiB
    a = torch.randint(0, 255, (n,), dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = bench(fixed(b.copy_, a), reps=20, inner=2, graph=False)
    copy = 2 * n / t
    del a, b
    m = 8192
    x = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    t = bench(fixed(operator.matmul, x, y), reps=10, inner=3, graph=False)
    return {"copy_bytes_per_s": copy, "matmul_bf16_flops": 2 * m**3 / t}


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        with sdpa_kernel([backend]):
            gqa = q.shape[1] != k.shape[1]
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return run


def _try(fn, *args):
    try:
        return fn(*args), None
    except Exception as e:  # a backend that refuses a shape is reported, not fatal
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def decode(dev, ops, results: dict) -> None:
    hq, hkv, d = 32, 8, 128
    scale = d**-0.5
    slots = 2 * torch.cuda.get_device_properties(dev).multi_processor_count  # resident decode CTAs
    g = torch.Generator(device=dev).manual_seed(0)
    for B, L in DEC_SHAPES:
        kv_bytes = 2 * B * L * hkv * d * 2
        entry: dict[str, Any] = {"batch": B, "context": L, "kv_bytes": kv_bytes}
        ctx = torch.full((B,), L, dtype=torch.int32, device=dev)
        q = torch.randn(B, hq, d, generator=g, device=dev).to(torch.bfloat16)
        for bs in (16, 64):
            nb = B * L // bs
            kc = torch.randn(nb, bs, hkv, d, generator=g, device=dev).to(torch.bfloat16)
            vc = torch.randn(nb, bs, hkv, d, generator=g, device=dev).to(torch.bfloat16)
            bt = torch.randperm(nb, generator=g, device=dev).to(torch.int32).view(B, L // bs)
            t = bench(fixed(ops.decode_attention, q, kc, vc, ctx, bt, scale), reps=30)
            splits = {}
            for s in (1, 2, 4, 8, 16, 32, 64, 128):  # the split-KV heuristic's alternatives
                if B * hkv * s <= 4 * slots and L // s >= 128:
                    splits[s] = kv_bytes / bench(
                        fixed(ops.decode_attention, q, kc, vc, ctx, bt, scale, num_splits=s), reps=20)
            entry[f"bs{bs}"] = {
                "bytes_per_s": kv_bytes / t,
                "num_splits": ops.decode_num_splits(B, hkv, hq // hkv, L, slots // 2),
                "bytes_per_s_by_splits": splits,
                "bytes_per_s_warp": kv_bytes / bench(  # one warp per (sequence, kv head)
                    fixed(ops.decode_attention, q, kc, vc, ctx, bt, scale, plan="warp"), reps=20),
            }
            if bs == 16:  # same data, contiguous, for the peers and a sanity check of the output
                ours = ops.decode_attention(q, kc, vc, ctx, bt, scale)
                order = bt.long().flatten()
                kk = kc[order].view(B, L, hkv, d).transpose(1, 2).contiguous()  # (B, Hkv, L, D)
                vv = vc[order].view(B, L, hkv, d).transpose(1, 2).contiguous()
            del kc, vc
        qq = q.view(B, hq, 1, d)
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
            run = _sdpa(name)
            ref, err = _try(run, qq, kk, vv, False)
            key = name
            if err:  # no native GQA in this backend: K/V expanded to Hq heads (reads 4x the bytes)
                entry[name] = {"error": err}
                key = name + "_expanded_kv"
                kx, vx = kk.repeat_interleave(hq // hkv, 1), vv.repeat_interleave(hq // hkv, 1)
                ref, err = _try(run, qq, kx, vx, False)
                if err:
                    entry[key] = {"error": err}
                    continue
                entry[key] = {"bytes_per_s": kv_bytes / bench(fixed(run, qq, kx, vx, False), reps=30)}
                del kx, vx
            else:
                entry[key] = {"bytes_per_s": kv_bytes / bench(fixed(run, qq, kk, vv, False), reps=30)}
            entry[key]["max_abs_diff_vs_ours"] = (ref.view(B, hq, d).float() - ours.float()).abs().max().item()
        del kk, vv
        results["decode"].append(entry)
        torch.cuda.empty_cache()


def decode_ragged(dev, ops, results: dict) -> None:
    """Decode over a batch of unequal contexts (what continuous batching produces), GQA 32/8, d = 128, bf16,
    random page order: the kernel's own plan (auto: balanced slices for a ragged batch) against its split plan
    (every sequence cut in the same number of pieces) on the same data. SDPA has no ragged decode to compare."""
    hq, hkv, d = 32, 8, 128
    g = torch.Generator(device=dev).manual_seed(1)
    for B, lo, hi, spread in DEC_RAGGED:
        if spread == "one long":
            lens = [hi] + [lo] * (B - 1)
        else:
            lens = torch.randint(lo, hi + 1, (B,), generator=torch.Generator().manual_seed(B)).tolist()
        kv_bytes = 2 * sum(lens) * hkv * d * 2
        entry: dict[str, Any] = {"batch": B, "lens": lens, "kv_bytes": kv_bytes}
        ctx = torch.tensor(lens, dtype=torch.int32, device=dev)
        q = torch.randn(B, hq, d, generator=g, device=dev).to(torch.bfloat16)
        for bs in (16, 64):
            per = -(-hi // bs)
            nb = B * per
            kc = torch.randn(nb, bs, hkv, d, generator=g, device=dev).to(torch.bfloat16)
            vc = torch.randn(nb, bs, hkv, d, generator=g, device=dev).to(torch.bfloat16)
            bt = torch.randperm(nb, generator=g, device=dev).to(torch.int32).view(B, per)
            entry[f"bs{bs}"] = {
                plan: kv_bytes / bench(fixed(ops.decode_attention, q, kc, vc, ctx, bt, d**-0.5, plan=plan), reps=30)
                for plan in ("auto", "split", "warp")}
            del kc, vc
        results["decode_ragged"].append(entry)
        torch.cuda.empty_cache()


def prefill(dev, ops, results: dict) -> None:
    h, d = 16, 128
    scale = d**-0.5
    g = torch.Generator(device=dev).manual_seed(1)
    for L in PREFILL_LENS:
        B = PREFILL_TOKENS // L
        flops = 4 * B * h * d * L * L / 2  # causal: half the (query, key) pairs, as flash-attn counts
        entry: dict[str, Any] = {"batch": B, "seqlen": L, "flops": flops}
        q = torch.randn(B * L, h, d, generator=g, device=dev).to(torch.bfloat16)
        cu = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=dev)
        ctx = torch.full((B,), L, dtype=torch.int32, device=dev)
        out = torch.empty_like(q)
        for bs in (16, 64):
            nb = B * L // bs
            kc = torch.randn(nb, bs, h, d, generator=g, device=dev).to(torch.bfloat16)
            vc = torch.randn(nb, bs, h, d, generator=g, device=dev).to(torch.bfloat16)
            bt = torch.randperm(nb, generator=g, device=dev).to(torch.int32).view(B, L // bs)
            impl = ops.prefill_impl(dev.index)
            t = bench(fixed(ops.prefill_attention, q, kc, vc, cu, ctx, bt, L, scale, out=out), reps=10, inner=4)
            entry[f"bs{bs}"] = {"flops_per_s": flops / t, "impl": impl}
            if impl != "mma":  # the portable mma.sync kernel on the same data, for comparison
                entry[f"bs{bs}"]["flops_per_s_mma"] = flops / bench(fixed(
                    ops.prefill_attention, q, kc, vc, cu, ctx, bt, L, scale, out=out, impl="mma"), reps=10, inner=4)
            if bs == 16:
                ours = ops.prefill_attention(q, kc, vc, cu, ctx, bt, L, scale)
                order = bt.long().flatten()
                kk = kc[order].view(B, L, h, d).transpose(1, 2).contiguous()
                vv = vc[order].view(B, L, h, d).transpose(1, 2).contiguous()
            del kc, vc
        qq = q.view(B, L, h, d).transpose(1, 2).contiguous()
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
            run = _sdpa(name)
            ref, err = _try(run, qq, kk, vv, True)
            if err:
                entry[name] = {"error": err}
                continue
            entry[name] = {"flops_per_s": flops / bench(fixed(run, qq, kk, vv, True), reps=10, inner=4)}
            diff = ref.transpose(1, 2).reshape(B * L, h, d).float() - ours.float()
            entry[name]["max_abs_diff_vs_ours"] = diff.abs().max().item()
        del kk, vv, qq, q, out
        results["prefill"].append(entry)
        torch.cuda.empty_cache()


def elementwise(dev, ops, results: dict) -> None:
    g = torch.Generator(device=dev).manual_seed(2)
    bf = torch.bfloat16

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, device=dev).to(bf)

    T = 16384

    # rope_kv_append, Qwen3-0.6B shape with q/k norm: read qkv, write q + k + v
    hq, hkv, d, bs = 16, 8, 128, 16
    width = (hq + 2 * hkv) * d
    nbytes = 2 * T * width * 2
    n = _sets(nbytes)
    qkvs = [rnd(T, width) for _ in range(n)]
    pos = torch.randint(0, 4096, (T,), generator=g, device=dev, dtype=torch.int32)
    slots = torch.randperm(T, generator=g, device=dev).to(torch.int32)
    cos_sin = torch.randn(4096, d, generator=g, device=dev)
    kc = torch.empty(T // bs, bs, hkv, d, dtype=bf, device=dev)  # (num_blocks, block_size, Hkv, D)
    vc = torch.empty_like(kc)
    qn, kn = rnd(d), rnd(d)
    t = bench(rotating(ops.rope_kv_append, [(qkv, pos, cos_sin, slots, kc, vc, qn, kn) for qkv in qkvs]), reps=20)
    results["elementwise"]["rope_kv_append"] = {"shape": f"T={T} Hq={hq} Hkv={hkv} d={d} qk_norm", "bytes": nbytes,
                                                "bytes_per_s": nbytes / t}
    del qkvs, kc, vc

    H = 4096
    for fused in (False, True):
        nbytes = (4 if fused else 2) * T * H * 2
        n = _sets(nbytes)
        xs = [rnd(T, H) for _ in range(n)]
        res = [rnd(T, H) for _ in range(n)] if fused else [None] * n
        w = rnd(H)
        out, rout = torch.empty(T, H, dtype=bf, device=dev), torch.empty(T, H, dtype=bf, device=dev)
        sets = [(x, w, 1e-6, r) for x, r in zip(xs, res, strict=True)]
        t = bench(rotating(ops.rms_norm, sets, out=out, **({"residual_out": rout} if fused else {})), reps=20)
        key = "rms_norm_add" if fused else "rms_norm"
        results["elementwise"][key] = {"shape": f"T={T} hidden={H}", "bytes": nbytes, "bytes_per_s": nbytes / t}
        del xs, res, sets

    inter = 3072
    nbytes = 3 * T * inter * 2
    n = _sets(nbytes)
    xs = [rnd(T, 2 * inter) for _ in range(n)]
    out = torch.empty(T, inter, dtype=bf, device=dev)
    for act in ("silu_mul", "gelu_tanh_mul"):
        t = bench(rotating(getattr(ops, act), [(x,) for x in xs], out=out), reps=20)
        results["elementwise"][act] = {"shape": f"T={T} inter={inter}", "bytes": nbytes, "bytes_per_s": nbytes / t}


def moe_layer(dev, ops, results: dict) -> None:
    """One MoE layer (bf16) per decode batch size T: ops.moe's two implementations, the per-expert loop (timed
    eagerly, as the engine runs it: it syncs with the host, so it cannot be captured) and the grouped GEMMs (eager,
    and replayed from a CUDA graph as the engine's decode steps run them), against the floor: the bytes of the
    experts the batch activates (and the router) read once at HBM peak. Two weight sets, alternated so that one
    call's experts are not in L2 from the call before."""
    from flashgen.ops import cuda_moe
    from flashgen.ops.torch_moe import route

    E, k, H, inter = MOE_SHAPE
    g = torch.Generator(device=dev).manual_seed(4)
    bf = torch.bfloat16
    sets = [(torch.randn(E, H, generator=g, device=dev).to(bf) * 0.05, *_moe_weights(dev, E, 2 * (i + 1)))
            for i in range(2)]
    why = cuda_moe.grouped_unsupported(bf, sets[0][1], sets[0][2])
    per_expert = 3 * H * inter * 2
    for T in MOE_BATCHES:
        xs = [torch.randn(T, H, generator=g, device=dev).to(bf) for _ in sets]
        args = [(x, router, gate_up, down, k, True) for x, (router, gate_up, down) in zip(xs, sets, strict=True)]
        active = sum(len(set(route(x, r, k, True)[1].flatten().tolist())) for x, r, *_ in args) / len(args)
        e: dict[str, Any] = {"tokens": T, "experts_active": active,
                             "floor_s": (active * per_expert + E * H * 2) / HBM_PEAK,
                             "loop_s": bench(rotating(cuda_moe.moe_loop, args), reps=15, inner=4, graph=False)}
        if why is None:
            e["grouped_s"] = bench(rotating(cuda_moe.moe_grouped, args), reps=15, inner=4, graph=False)
            e["grouped_graph_s"] = bench(rotating(cuda_moe.moe_grouped, args), reps=15, inner=4)
        else:
            e["grouped_unsupported"] = why
        results["moe"].append(e)
        print(f"moe T={T}: {e}", file=sys.stderr)
    del sets
    torch.cuda.empty_cache()


def _moe_weights(dev, E: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (E, 2I, H) and (E, H, I) bf16 expert weights of MOE_SHAPE's sizes."""
    _, _, H, inter = MOE_SHAPE
    g = torch.Generator(device=dev).manual_seed(seed)
    gate_up = (torch.randn(E, 2 * inter, H, generator=g, device=dev) * H ** -0.5).to(torch.bfloat16)
    down = (torch.randn(E, H, inter, generator=g, device=dev) * inter ** -0.5).to(torch.bfloat16)
    return gate_up, down


def moe_table(r: dict) -> list[str]:
    E, k, H, inter = MOE_SHAPE
    lines = [f"MoE layer E={E} top_k={k} H={H} I={inter} bf16, us per call "
             f"(floor: active experts' bytes at {HBM_PEAK / 1e12:.2f} TB/s)",
             f"{'tokens':<8}{'experts':>8}{'loop':>10}{'grouped':>10}{'graph':>10}{'floor':>10}"]
    for e in r["moe"]:
        cells = [f"{e[key] * 1e6:>10.1f}" if key in e else f"{'-':>10}"
                 for key in ("loop_s", "grouped_s", "grouped_graph_s", "floor_s")]
        lines.append(f"{e['tokens']:<8}{e['experts_active']:>8.1f}" + "".join(cells))
        if "grouped_unsupported" in e:
            lines.append(f"  grouped: {e['grouped_unsupported']}")
    return lines


def linear_fp8(dev, ops, results: dict) -> None:
    """FP8 weights at M = 1: the FP8 skinny kernel (each variant) and cuBLASLt (torch._scaled_mm with row-wise
    scales, the bias-free path of linear_fp8) on the same quantized row, weight copies rotated past L2."""
    if torch.cuda.get_device_capability(dev) < (8, 9):
        results["linear_fp8"] = {"skipped": "FP8 needs compute capability 8.9 or later"}
        return
    from flashgen.ops import cuda_linear, torch_ops

    g = torch.Generator(device=dev).manual_seed(3)
    bf = torch.bfloat16
    out: dict[str, Any] = {}
    for name, (N, K) in LINEAR_8B.items():
        nbytes = N * K + 4 * N  # e4m3 weight + its float32 row scales (x and y are a few KB)
        n = _sets(nbytes)
        ws = [torch_ops.quantize_fp8_rows(torch.randn(N, K, generator=g, device=dev) * 0.02) for _ in range(n)]
        xq, xs = torch_ops.quantize_fp8_rows(torch.randn(1, K, generator=g, device=dev))
        sets = [(xq, xs, w, sc, None, bf) for w, sc in ws]
        y = torch.empty(1, N, dtype=bf, device=dev)
        e: dict[str, Any] = {"shape": f"M=1 N={N} K={K}", "bytes": nbytes,
                             "cublas": nbytes / bench(rotating(cuda_linear._fp8_gemm_bias, sets), reps=20)}
        for warps, unroll in ops.SKINNY_FP8_VARIANTS:
            t = bench(rotating(ops.skinny_gemm_fp8, sets, out=y, warps=warps, unroll=unroll), reps=20)
            e[f"skinny_{warps}x{unroll}"] = nbytes / t
        best = max((k for k in e if k.startswith("skinny_")), key=e.__getitem__)
        e["skinny_best"], e["skinny_best_variant"] = e[best], best.removeprefix("skinny_")
        out[name] = e
        del ws, sets
        torch.cuda.empty_cache()
    # one 8B layer's four linear layers, each by the faster of the two, times 32 layers (not the lm_head, attention
    # or the activation quantization): the linear layers' share of a batch-1 decode step
    per_layer = sum(out[k]["bytes"] / max(out[k]["skinny_best"], out[k]["cublas"]) for k in FUSED_8B)
    out["8b_linear_ms_per_token"] = 1e3 * LAYERS_8B * per_layer
    results["linear_fp8"] = out


def table(r: dict) -> str:
    c = r["ceilings"]
    copy = c["copy_bytes_per_s"]
    lines = [
        f"device: {r['device']}   date: {r['date']}",
        f"{'figure':<34}{'ours':>12}{'FLASH':>10}{'CUDNN':>10}{'ceiling':>10}",
        f"{'copy (read + write)':<34}{copy / 1e12:>10.2f}TB/s",
        f"{'bf16 matmul 8192^3':<34}{c['matmul_bf16_flops'] / 1e12:>8.0f}TFLOP/s",
    ]

    def peer(e: dict, backend: str, key: str, scale: float, fmt: str) -> str:
        for name in (backend, backend + "_expanded_kv"):
            if key in e.get(name, {}):
                return format(e[name][key] / scale, fmt) + ("*" if name != backend else "")
        return "n/a"

    def row(label: str, e: dict, bs: int, key: str, fmt: str, ceiling: float) -> str:
        """ours (tera-units), the two SDPA peers, and ours as a percentage of the ceiling."""
        ours = e[f"bs{bs}"][key]
        return (f"{label:<34}{format(ours / 1e12, fmt):>12}"
                f"{peer(e, 'FLASH_ATTENTION', key, 1e12, fmt):>10}{peer(e, 'CUDNN_ATTENTION', key, 1e12, fmt):>10}"
                f"{100 * ours / ceiling:>9.0f}%")

    for e in r["decode"]:
        for bs in (16, 64):
            label = f"decode B{e['batch']} L{e['context']} bs{bs} TB/s"
            lines.append(row(label, e, bs, "bytes_per_s", ".2f", copy))
            if "bytes_per_s_warp" in e[f"bs{bs}"]:
                warp = e[f"bs{bs}"]["bytes_per_s_warp"]
                lines.append(f"{'  (warp plan)':<34}{warp / 1e12:>12.2f}{'':>20}{100 * warp / copy:>9.0f}%")
    for e in r.get("decode_ragged", []):
        for bs in (16, 64):
            auto, split = e[f"bs{bs}"]["auto"], e[f"bs{bs}"]["split"]
            label = f"decode ragged B{e['batch']} L{min(e['lens'])}-{max(e['lens'])} bs{bs}"
            lines.append(f"{label:<34}{auto / 1e12:>12.2f}{'split plan':>14}{split / 1e12:>6.2f}"
                         f"{100 * auto / copy:>9.0f}%")
            if "warp" in e[f"bs{bs}"]:
                warp = e[f"bs{bs}"]["warp"]
                lines.append(f"{'  (warp plan)':<34}{warp / 1e12:>12.2f}{'':>20}{100 * warp / copy:>9.0f}%")
    for e in r["prefill"]:
        for bs in (16, 64):
            label = f"prefill L{e['seqlen']} bs{bs} {e[f'bs{bs}'].get('impl', '')} TFLOP/s"
            lines.append(row(label, e, bs, "flops_per_s", ".0f", c["matmul_bf16_flops"]))
            if "flops_per_s_mma" in e[f"bs{bs}"]:
                mma = e[f"bs{bs}"]["flops_per_s_mma"]
                lines.append(f"{'  (mma kernel)':<34}{mma / 1e12:>12.0f}{'':>20}"
                             f"{100 * mma / c['matmul_bf16_flops']:>9.0f}%")
    for k, e in r["elementwise"].items():
        lines.append(f"{k + ' GB/s':<34}{e['bytes_per_s'] / 1e9:>12.0f}{'':>20}{100 * e['bytes_per_s'] / copy:>9.0f}%")
    if r.get("moe"):
        lines += moe_table(r)
    lf = r.get("linear_fp8", {})
    if "skipped" in lf:
        lines.append(f"{'FP8 linear M1':<34}skipped: {lf['skipped']}")
    for k, e in lf.items():
        if isinstance(e, dict) and "skinny_best" in e:
            label = f"FP8 linear M1 {k} {e['skinny_best_variant']} TB/s"
            lines.append(f"{label:<34}{e['skinny_best'] / 1e12:>12.2f}{'cuBLASLt':>14}{e['cublas'] / 1e12:>6.2f}"
                         f"{100 * e['skinny_best'] / copy:>9.0f}%")
    if "8b_linear_ms_per_token" in lf:
        lines.append(f"{'FP8 8B linear layers ms/token':<34}{lf['8b_linear_ms_per_token']:>12.2f}"
                     f"   (32 layers, the faster kernel per shape)")
    return "\n".join(lines)


STEPS = ("decode", "decode_ragged", "prefill", "elementwise", "linear_fp8", "moe_layer")


def main(out_dir: str | None = None, only: str | None = None) -> int:
    steps = STEPS if only is None else tuple(only.split(","))
    if any(st not in STEPS for st in steps):
        print(f"kernel benchmark: --only takes steps of {', '.join(STEPS)}, got {only!r}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("kernel benchmark: no CUDA device is visible", file=sys.stderr)
        return 2
    from flashgen.ops import cuda_ops

    dev = torch.device("cuda", torch.cuda.current_device())
    results = {
        "device": torch.cuda.get_device_name(dev),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "command": "PYTHONPATH=. python -m flashgen.bench.kernels" + (f" --only {only}" if only else ""),
        "decode": [], "decode_ragged": [], "prefill": [], "elementwise": {}, "linear_fp8": {}, "moe": [],
    }
    results["ceilings"] = ceilings(dev)
    print(f"ceilings: {results['ceilings']}", file=sys.stderr)
    for step in (decode, decode_ragged, prefill, elementwise, linear_fp8, moe_layer):
        if step.__name__ not in steps:
            continue
        step(dev, cuda_ops, results)
        print(f"{step.__name__}: done", file=sys.stderr)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "kernels.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    only_steps = None
    if "--only" in argv:
        i = argv.index("--only")
        only_steps = argv[i + 1] if i + 1 < len(argv) else ""
        del argv[i:i + 2]
    sys.exit(main(argv[0] if argv else None, only_steps))
