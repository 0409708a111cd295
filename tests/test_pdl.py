"""Programmatic dependent launch (flashgen/ops/jit.py, PDL_KERNELS; docs/design.md, "Programmatic dependent
launch"): every kernel launched that way has common.cuh's prologue in its own source, the launch structures have
the driver's layout and carry the kernel's arguments as the kernel declares them (CPU), and on the GPU a chain of
the decode-step kernels gives the same bits with PDL on and off, eagerly and replayed from a CUDA graph."""
from __future__ import annotations

import ctypes
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from flashgen.ops import jit

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
_GLOBAL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(')


def _kernel_bodies() -> dict[str, str]:
    """Each extern "C" kernel's name -> its body's text (from the brace after its parameters to the matching one)."""
    bodies = {}
    for src in sorted(KERNELS.glob("*.cu")):
        text = src.read_text()
        for m in _GLOBAL.finditer(text):
            depth, i = 0, m.end() - 1
            while True:  # the parameter list, whose #if blocks may hold parentheses of their own
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
                if depth == 0:
                    break
            start = text.index("{", i)
            depth, j = 0, start
            while True:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
                if depth == 0:
                    break
            bodies[m.group(1)] = text[start + 1:j - 1]
    return bodies


def _code(body: str) -> list[str]:
    """The body's statements' lines without comments, blank lines and preprocessor lines."""
    lines = [re.sub(r"//.*", "", ln).strip() for ln in body.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def test_every_pdl_kernel_waits_before_it_touches_memory():
    """A kernel in PDL_KERNELS opens with pdl_prologue(), or with pdl_allow_next() and then, before pdl_wait(),
    nothing but declarations and the weight loads of the skinny GEMMs' first chunk; a kernel whose source calls
    pdl_wait is in PDL_KERNELS (the list and the sources agree both ways)."""
    bodies = _kernel_bodies()
    assert jit.PDL_KERNELS <= bodies.keys(), sorted(jit.PDL_KERNELS - bodies.keys())
    for name in sorted(jit.PDL_KERNELS):
        code = _code(bodies[name])
        if code[0] == "pdl_prologue();":
            continue
        assert "pdl_allow_next();" in code and "pdl_wait();" in code, name
        before = code[:code.index("pdl_wait();")]
        loads = [ln for ln in before if "load_chunk" in ln]
        assert loads and all(re.search(r"load_chunk(_fp8)?_w\(", ln) for ln in loads), (name, loads)
    waits = {n for n, b in bodies.items() if "pdl_wait" in b or "pdl_prologue" in b}
    assert waits == set(jit.PDL_KERNELS)


def test_skinny_weight_loads_read_only_the_weights():
    """The loads issued before pdl_wait (load_chunk_w, load_chunk_fp8_w) take no x pointer: they read W only."""
    for src, fn in (("skinny_gemm.cu", "load_chunk_w"), ("skinny_gemm_fp8.cu", "load_chunk_fp8_w")):
        text = (KERNELS / src).read_text()
        sig = re.search(rf"FG_INLINE void {fn}\(([^)]*)\)", text)
        assert sig is not None, fn
        assert "xr" not in sig.group(1) and "x" not in re.findall(r"\b(\w+)\s*(?:,|$)", sig.group(1)), sig.group(1)


def test_launch_structures_have_the_driver_layout():
    """CUlaunchAttribute: id, padding to 8, a 64-byte value; CUlaunchConfig: 7 uints, then the stream, the
    attribute pointer and their count at 8-byte alignment (cuda.h, CUDA 12)."""
    assert ctypes.sizeof(jit._LaunchAttr) == 72
    assert jit._LaunchAttr.value.offset == 8
    assert jit._LaunchConfig.shared_mem.offset == 24
    assert jit._LaunchConfig.stream.offset == 32
    assert jit._LaunchConfig.attrs.offset == 40
    assert jit._LaunchConfig.num_attrs.offset == 48
    assert ctypes.sizeof(jit._LaunchConfig) == 56
    assert jit._PSS_ATTR.id == 6 and jit._PSS_ATTR.value[0] == 1


def test_pdl_launch_passes_each_argument_with_its_c_type(monkeypatch):
    """_launch_pdl hands cuLaunchKernelEx the grid, block, shared memory, stream, the serialization attribute and
    one pointer per argument holding its value in the C type launch's helpers give it."""
    seen = {}

    class FakeLib:
        def cuLaunchKernelEx(self, cfg, fn, params, extra):
            c = cfg._obj
            seen.update(grid=tuple(c.grid), block=tuple(c.block), smem=c.shared_mem, stream=c.stream, fn=fn,
                        attr=(c.attrs[0].id, c.attrs[0].value[0]), n_attrs=c.num_attrs, extra=extra)
            seen["args"] = (ctypes.c_uint64.from_address(params[0]).value,
                            ctypes.c_int32.from_address(params[1]).value,
                            ctypes.c_float.from_address(params[2]).value,
                            ctypes.c_int64.from_address(params[3]).value)
            return 0

    class FakeKernel:
        class kernel:
            ptr = 0xABC0

    monkeypatch.setattr(jit, "_driver", lambda: FakeLib())
    jit._launch_pdl(FakeKernel(), (7, 2), (128,), (jit.ptr(None), jit.i32(-3), jit.f32(0.5), jit.i64(1 << 40)),
                    0x1234, 4096)
    assert seen["grid"] == (7, 2, 1) and seen["block"] == (128, 1, 1) and seen["smem"] == 4096
    assert seen["stream"] == 0x1234 and seen["fn"] == 0xABC0 and seen["extra"] is None
    assert seen["attr"] == (6, 1) and seen["n_attrs"] == 1
    assert seen["args"] == (0, -3, 0.5, 1 << 40)
    p = np.uint64(0xDEADBEEF0)
    jit._launch_pdl(FakeKernel(), (1,), (32,), (p, jit.i32(0), jit.f32(0.0), jit.i64(0)), 0, 0)
    assert seen["args"][0] == 0xDEADBEEF0


def test_pdl_launches_reuse_their_structures_and_each_gets_its_own_values(monkeypatch):
    """The argument blocks and launch configurations are made once and reused: launches of different signatures
    and shapes, one after another and from two threads at once, each hand the driver their own grid and values."""
    seen: list = []

    class FakeLib:
        def cuLaunchKernelEx(self, cfg, fn, params, extra):
            c = cfg._obj
            vals = [ctypes.c_uint64.from_address(params[0]).value, ctypes.c_int32.from_address(params[1]).value]
            if fn == 2:
                vals.append(ctypes.c_float.from_address(params[2]).value)
            seen.append((fn, c.grid[0], c.shared_mem, tuple(vals)))
            return 0

    class K1:
        class kernel:
            ptr = 1

    class K2:
        class kernel:
            ptr = 2

    monkeypatch.setattr(jit, "_driver", lambda: FakeLib())
    for i in range(50):
        jit._launch_pdl(K1, (i + 1,), (32,), (np.uint64(1000 + i), jit.i32(-i)), 0, 0)
        jit._launch_pdl(K2, (2 * i + 1,), (64,), (np.uint64(7 * i), jit.i32(i), jit.f32(i / 4)), 0, 256 * i)
    assert seen == [x for i in range(50) for x in ((1, i + 1, 0, (1000 + i, -i)),
                                                     (2, 2 * i + 1, 256 * i, (7 * i, i, i / 4)))]
    blocks, configs = jit._launch_cache()
    assert len(blocks) >= 2 and len(configs) >= 100

    seen.clear()
    errors: list = []

    def worker(t: int):
        try:
            for i in range(200):
                jit._launch_pdl(K1, (t,), (32,), (np.uint64(t), jit.i32(i)), 0, 0)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (1, 2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for t in (1, 2):  # every launch of a thread carries that thread's grid and value, in order
        assert [v[1] for _, g, _, v in seen if g == t] == list(range(200))
        assert all(v[0] == t for _, g, _, v in seen if g == t)


def test_pdl_launch_raises_with_the_driver_message(monkeypatch):
    class FakeLib:
        def cuLaunchKernelEx(self, *a):
            return 701

        def cuGetErrorString(self, rc, out):
            out._obj.value = b"too many resources requested for launch"
            return 0

    class FakeKernel:
        class kernel:
            ptr = 1

    monkeypatch.setattr(jit, "_driver", lambda: FakeLib())
    with pytest.raises(RuntimeError, match="CUDA error 701: too many resources"):
        jit._launch_pdl(FakeKernel(), (1,), (32,), (jit.i32(1),), 0, 0)


def test_pdl_mode_reads_the_environment(monkeypatch):
    monkeypatch.delenv("FLASHGEN_PDL", raising=False)
    assert jit.pdl_mode() == "auto"
    monkeypatch.setenv("FLASHGEN_PDL", "0")
    assert jit.pdl_mode() == "0"
    monkeypatch.setenv("FLASHGEN_PDL", "yes")
    with pytest.raises(ValueError, match="FLASHGEN_PDL='yes': use auto"):
        jit.pdl_mode()


def _chain(x, res, w_norm, wq, wq_scale, w_bf16, ops):
    """The FP8 decode layer's kernel chain at a few rows: norm+quantize, FP8 skinny GEMM, activation+quantize,
    FP8 skinny GEMM, norm with the residual, bf16 skinny GEMM."""
    from flashgen.ops import cuda_linear

    rows, res2 = ops.rms_norm_fp8(x, w_norm, 1e-6, res)
    h = cuda_linear.skinny_gemm_fp8(rows.q, rows.scale, wq[0], wq_scale[0], None, x.dtype)
    a = ops.act_mul_fp8(h, "silu")
    y = cuda_linear.skinny_gemm_fp8(a.q, a.scale, wq[1], wq_scale[1], None, x.dtype)
    z, res3 = ops.rms_norm(y, w_norm, 1e-6, res2)
    return cuda_linear.skinny_gemm(z, w_bf16), res3


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 5])
def test_decode_chain_is_bitwise_the_same_with_and_without_pdl(rows, monkeypatch):
    """On fresh random data, the chain's outputs with PDL on are those with it off, bit for bit, eagerly and from
    a replayed CUDA graph (whose inputs are refilled between replays)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("PDL needs sm_90 or later")
    from flashgen.ops import cuda_ops

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1234 + rows)
    H, inter = 1024, 2816
    bf = torch.bfloat16

    def randn(*shape, dtype=bf):
        return torch.randn(*shape, generator=g, device=dev).to(dtype)

    w_norm = randn(H) * 0.1 + 1
    wq = [(randn(2 * inter, H) * 0.5).to(torch.float8_e4m3fn), (randn(H, inter) * 0.5).to(torch.float8_e4m3fn)]
    wq_scale = [torch.rand(2 * inter, generator=g, device=dev) * 0.02 + 0.01,
                torch.rand(H, generator=g, device=dev) * 0.02 + 0.01]
    w_bf16 = randn(4096, H) * 0.05
    x, res = randn(rows, H), randn(rows, H)

    def run(mode: str):
        monkeypatch.setenv("FLASHGEN_PDL", mode)
        jit.pdl_on.cache_clear()
        assert jit.pdl_on(dev.index or 0) == (mode == "auto")
        eager = _chain(x, res.clone(), w_norm, wq, wq_scale, w_bf16, cuda_ops)
        sx, sres = x.clone(), res.clone()
        _chain(sx, sres.clone(), w_norm, wq, wq_scale, w_bf16, cuda_ops)  # warm-up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        sres_in = sres.clone()
        with torch.cuda.graph(graph):
            out = _chain(sx, sres_in, w_norm, wq, wq_scale, w_bf16, cuda_ops)
        replays = []
        for k in range(3):
            sx.copy_(x * (1 + k))
            sres_in.copy_(res)
            graph.replay()
            replays.append((out[0].clone(), out[1].clone()))
        torch.cuda.synchronize()
        return eager, replays

    try:
        on, on_graph = run("auto")
        off, off_graph = run("0")
    finally:
        jit.pdl_on.cache_clear()
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a, b)
    for (a0, a1), (b0, b1) in zip(on_graph, off_graph, strict=True):
        assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert on_graph[0][0].abs().sum() > 0 and not torch.equal(on_graph[0][0], on_graph[1][0])


def test_pdl_status_says_why_it_is_off(monkeypatch):
    """`flashgen doctor`'s line: on, or off with the reason (the environment, the GPU's architecture, the driver)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(jit, "pdl_on", lambda i: True)
    monkeypatch.delenv("FLASHGEN_PDL", raising=False)
    assert jit.pdl_status(0).startswith("on (")
    monkeypatch.setenv("FLASHGEN_PDL", "0")
    assert jit.pdl_status(0) == "off (FLASHGEN_PDL=0)"
    monkeypatch.delenv("FLASHGEN_PDL")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 9))
    assert jit.pdl_status(0) == "off (sm_89: it needs sm_90 or later)"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))
    monkeypatch.setattr(jit, "pdl_on", lambda i: False)
    assert "cuLaunchKernelEx" in jit.pdl_status(0)
