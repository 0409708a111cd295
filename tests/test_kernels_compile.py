"""Every kernel source compiles with nvcc for sm_80 and sm_90a, in every dtype / head_dim variant, without
register spills (CPU only: runs in CI wherever nvcc is installed). Also: the CUDA backend imports without
CuPy or a GPU.

The source handed to nvcc is the one NVRTC gets at run time (jit.py inlines kernels/common.cuh).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from flashgen.ops import cuda_attention, cuda_ops, jit

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
ARCHS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a")
SM90A_ONLY = {"prefill_attention_sm90.cu"}  # wgmma: Hopper's arch-specific target only
FP8_ARCHS = ("-gencode=arch=compute_89,code=sm_89", "-gencode=arch=compute_90a,code=sm_90a")  # e4m3 cvt/mma: sm_89+
# sm_89+ throughout (the FG_KV_FP8 variants of others too: 1 = the FP8 cache, 2 = the int8k cache)
FP8_SOURCES = {"kv_fp8.cu", "skinny_gemm_fp8.cu", "fp8_quant.cu"}
DTYPES = {"bf16": 0, "fp16": 1}
# source -> [(head_dim or None, extra defines)]: every variant cuda_ops can launch
SOURCES = {
    "norms.cu": [(None, "")],
    "sampling.cu": [(None, "SAMPLING_F32=1"), (None, "SAMPLING_F32=0")],
    "skinny_gemm.cu": [(None, "SG_U=8"), (None, "SG_U=4")],
    "skinny_gemm_fp8.cu": [(None, "SG_U=8"), (None, "SG_U=4")],
    "rope_kv_append.cu": [(d, kv) for kv in ("", "FG_KV_FP8=1", "FG_KV_FP8=2") for d in (64, 128, 256)],
    "decode_attention.cu": [(d, kv) for d in cuda_ops.ATTN_HEAD_DIMS
                            for kv in ("", "FG_KV_FP8=1", "FG_KV_FP8=2", "FG_MERGE_N=1")]
    + [(d, f"FG_WARP_PLAN=1,{kv}".rstrip(",")) for d in (64, 128)  # the warp plan's own variant
       for kv in ("", "FG_KV_FP8=1", "FG_KV_FP8=2", "FG_MERGE_N=1")],
    "kv_fp8.cu": [(None, "")],  # one variant holds both caches' kernels, KV_FP8_KERNELS
    "fp8_quant.cu": [(None, "")],
    "merge_states.cu": [(None, "")],
    "moe_route.cu": [(None, "")],
    "logprobs.cu": [(None, f"LP_F32={f},LP_K={k}") for f in (0, 1) for k in (5, 20)],
    "prefill_attention.cu": [(d, f"PF_MT={mt},PF_BN={bn}") for d in cuda_ops.ATTN_HEAD_DIMS
                             for mt, bn in cuda_ops.PREFILL_TILE_CHOICES_BY_DIM[d]]
    + [(d, f"PF_MT={mt},PF_BN={bn},PF_SHARED=1") for d, (mt, bn) in cuda_ops.SHARED_TILES.items()],
    "prefill_attention_sm90.cu": [(d, "") for d in cuda_ops.PREFILL_SM90_HEAD_DIMS],
}
KV_FP8_KERNELS = ("kv_dequant_pages_kernel", "kv_dequant_pages_int8k_kernel")  # kv_fp8.cu's, for each cache
VARIANTS = [(src, dt, d, extra) for src, vs in SOURCES.items() for dt in DTYPES for d, extra in vs
            if not (("SAMPLING_F32=1" in extra or "LP_F32=1" in extra) and dt == "fp16")]  # float32: one variant


def test_every_kernel_source_is_compiled():
    assert sorted(p.name for p in jit.kernel_dir().glob("*.cu")) == sorted(SOURCES)


def _compile(src: str, dtype: str, head_dim: int | None, extra: str, out_dir: str) -> tuple[int, str]:
    kdir = jit.kernel_dir()
    name = f"{src[:-3]}_{dtype}_{head_dim}_{extra.replace(',', '_').replace('=', '')}"
    cu = Path(out_dir) / f"{name}.cu"
    cu.write_text(jit._expand_includes(kdir / src))
    fp8 = src in FP8_SOURCES or "FG_KV_FP8=" in extra
    archs = ARCHS[1:] if src in SM90A_ONLY else FP8_ARCHS if fp8 else ARCHS
    cmd = [NVCC, "--std=c++17", f"-I{kdir}", "--fatbin", *archs,
           "--resource-usage", "-lineinfo", f"-DFG_DTYPE={DTYPES[dtype]}", "-o", str(Path(out_dir) / f"{name}.fatbin"),
           str(cu)]
    if head_dim:
        cmd.append(f"-DFG_HEAD_DIM={head_dim}")
    cmd += [f"-D{kv}" for kv in extra.split(",") if kv]
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, " ".join(cmd) + "\n" + p.stdout + p.stderr


@pytest.fixture(scope="module")
def compiled():
    if NVCC is None:
        pytest.skip("nvcc is neither on PATH nor at /usr/local/cuda/bin/nvcc")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        futures = {v: ex.submit(_compile, *v, tmp) for v in VARIANTS}
        yield {v: f.result() for v, f in futures.items()}


@pytest.mark.parametrize("src,dtype,head_dim,extra", VARIANTS)
def test_kernel_compiles(compiled, src, dtype, head_dim, extra):
    rc, log = compiled[(src, dtype, head_dim, extra)]
    assert rc == 0, f"nvcc failed for {src} {dtype} head_dim={head_dim} {extra}:\n{log}"
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert not any(spills), f"register spills in {src} {dtype} head_dim={head_dim} {extra}:\n{log}"
    # ptxas's C7513: it had to wait after every wgmma (an operand register redefined while one is in flight)
    assert "C7513" not in log, f"wgmma serialised in {src} {dtype} head_dim={head_dim} {extra}:\n{log}"
    if src == "kv_fp8.cu":  # one variant, the FP8 and the int8k caches' page dequantization
        for name in KV_FP8_KERNELS:
            assert f"Compiling entry function '{name}'" in log, f"{name} not compiled in {src} {dtype}:\n{log}"


def test_cuda_ops_imports_without_cupy():
    """Importing the CUDA backend needs neither CuPy nor a GPU; a call on CPU tensors is refused clearly."""
    code = (
        "import sys; sys.modules['cupy'] = None\n"  # make `import cupy` fail even where it is installed
        "import torch\n"
        "from flashgen.ops import cuda_ops, jit\n"
        "try:\n"
        "    cuda_ops.silu_mul(torch.zeros(2, 16, dtype=torch.bfloat16))\n"
        "except ValueError as e:\n"
        "    assert 'must be a CUDA tensor' in str(e), e\n"
        "try:\n"
        "    jit._cupy()\n"
        "except ImportError as e:\n"
        "    assert 'flashgen[cuda13]' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no ImportError')\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr


def test_prefill_impl_choice(monkeypatch):
    """FLASHGEN_PREFILL picks the prefill kernel; a bad value is refused with the value and the choices."""
    monkeypatch.setenv("FLASHGEN_PREFILL", "mma")
    assert cuda_ops.prefill_impl(0) == "mma"
    monkeypatch.setenv("FLASHGEN_PREFILL", "wgmma")
    assert cuda_ops.prefill_impl(0) == "wgmma"
    monkeypatch.setenv("FLASHGEN_PREFILL", "fa3")
    with pytest.raises(ValueError, match=r"FLASHGEN_PREFILL must be one of auto, wgmma, mma, got 'fa3'"):
        cuda_ops.prefill_impl(0)


def test_linear_choice_refuses_a_bad_value(monkeypatch):
    """FLASHGEN_LINEAR forces cuBLAS or the skinny kernel; a bad value is refused, before any measurement, with
    the variable, the value and the choices."""
    monkeypatch.setenv("FLASHGEN_LINEAR", "cublas")
    assert cuda_ops.linear_plan(1, torch.empty(8, 16), None) is None
    monkeypatch.setenv("FLASHGEN_LINEAR", "skinny")
    assert cuda_ops.linear_plan(1, torch.empty(8, 16), None) == cuda_ops.SKINNY_VARIANTS[0]
    monkeypatch.setenv("FLASHGEN_LINEAR", "gemv")
    with pytest.raises(ValueError, match=r"FLASHGEN_LINEAR must be one of auto, cublas, skinny, got 'gemv'"):
        cuda_ops.linear_plan(1, torch.empty(8, 16), None)


def test_decode_plan_choice(monkeypatch):
    """The decode plan: the argument first, then FLASHGEN_DECODE_PLAN, then auto; a bad value is refused with
    where it came from, the value and the choices."""
    monkeypatch.delenv("FLASHGEN_DECODE_PLAN", raising=False)
    assert cuda_ops.decode_plan() == "auto"
    monkeypatch.setenv("FLASHGEN_DECODE_PLAN", "split")
    assert cuda_ops.decode_plan() == "split"
    assert cuda_ops.decode_plan("balanced") == "balanced"
    assert cuda_ops.decode_plan("warp") == "warp"
    monkeypatch.setenv("FLASHGEN_DECODE_PLAN", "even")
    with pytest.raises(ValueError,
                       match=r"FLASHGEN_DECODE_PLAN must be one of auto, split, balanced, warp, got 'even'"):
        cuda_ops.decode_plan()
    with pytest.raises(ValueError, match=r"plan must be one of auto, split, balanced, warp, got 'fast'"):
        cuda_ops.decode_plan("fast")


@pytest.mark.parametrize("hkv,group,head_dim,sms,want", [
    (8, 2, 128, 132, 198),   # Qwen3-0.6B's heads on an H100: 8 pairs a sequence, 12 x 132 pairs
    (8, 4, 64, 132, 198),
    (8, 16, 128, 132, 99),   # 16 query heads a kv head: two pairs of 8
    (2, 1, 64, 132, 792),
    (1, 8, 128, 1, 12),
    (8, 2, 256, 132, None),  # no warp plan compiled at head_dim 256
])
def test_warp_min_batch_gives_every_sm_its_pairs(hkv, group, head_dim, sms, want):
    """The least batch at which auto takes the warp plan on short contexts: WARP_AUTO_PAIRS_PER_SM (sequence, kv
    head, 8 query heads) pairs for every SM, rounded up to whole sequences."""
    got = cuda_ops.warp_min_batch(hkv, group, head_dim, sms)
    assert got == want
    if got is not None:
        per_seq = hkv * -(-group // 8)
        assert got * per_seq >= cuda_attention.WARP_AUTO_PAIRS_PER_SM * sms > (got - 1) * per_seq


def test_warp_auto_takes_the_warp_plan_for_a_large_batch_of_short_contexts():
    """auto's rule, which the decode launch and the engine's short-context graphs both apply: at least the least
    batch and at most WARP_AUTO_MAX_CONTEXT tokens; never without a least batch (no warp plan compiled)."""
    cap = cuda_attention.WARP_AUTO_MAX_CONTEXT
    assert cuda_attention.warp_auto(198, cap, 198) and cuda_attention.warp_auto(256, 1, 198)
    assert not cuda_attention.warp_auto(197, cap, 198)
    assert not cuda_attention.warp_auto(256, cap + 1, 198)
    assert not cuda_attention.warp_auto(10_000, 1, None)


def test_nvrtc_target_swaps_and_restores_cupys_arch_helper(monkeypatch):
    """The sm_90a build goes through CuPy's own NVRTC path with its arch helper swapped for one compile; the
    original comes back even when the compile fails."""
    import types

    compiler = types.ModuleType("cupy.cuda.compiler")

    def orig(arch=None):
        return ("-arch=sm_90", "cubin")

    compiler._get_arch_for_options_for_nvrtc = orig
    cuda = types.ModuleType("cupy.cuda")
    cuda.compiler = compiler
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.compiler", compiler)
    with jit._nvrtc_target("sm_90a"):
        assert compiler._get_arch_for_options_for_nvrtc() == ("-arch=sm_90a", "cubin")
    assert compiler._get_arch_for_options_for_nvrtc is orig
    with pytest.raises(RuntimeError, match="nvrtc failed"):
        with jit._nvrtc_target("sm_90a"):
            raise RuntimeError("nvrtc failed")
    assert compiler._get_arch_for_options_for_nvrtc is orig
    assert jit.ARCH_SPECIFIC["sm_90"] == "sm_90a"


def test_tma_map_refuses_mismatched_geometry():
    """A tensor map's dims, strides and box must describe one rank; the check comes before the driver call."""
    from flashgen.ops import tma

    with pytest.raises(ValueError, match="do not fit one rank"):
        tma.encode_tiled(0x1000, (128, 8, 1024), (256,), (64, 1, 16))
    with pytest.raises(ValueError, match="do not fit one rank"):
        tma.encode_tiled(0x1000, (128, 8), (256,), (64, 1, 16))
