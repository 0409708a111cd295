"""What reading the paged cache costs, without attention: a CuPy kernel that reads every K/V byte of a decode
batch through the block table with 16-byte `ld.global.nc.L1::no_allocate.L2::256B` loads (the decode kernel's)
and computes nothing. hpc = kv heads per CTA: 1 is the decode kernel's pattern (one head's 256-byte piece of each
token row, rows 2 KB apart), 8 reads whole token rows (all heads, contiguous). Best of several CTA counts, 128
or 256 threads, 8 or 16 loads in flight per thread; random and in-order pages; GQA 32/8, d 128, bf16; TB/s
(K+V bytes / time, CUDA-graph replays), SDPA CUDNN on contiguous K/V last.
  PYTHONPATH=. python3 tools/probes/decode_read_probe.py"""
import cupy as cp
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashgen.ops import jit
from flashgen.ops.timing import bench, fixed

SRC = r'''
typedef unsigned int u32;
extern "C" __global__ void __launch_bounds__(NT) readk(const char* __restrict__ kc, const char* __restrict__ vc,
    const int* __restrict__ bt, int L, int log2bs, int hkv, int splits, int hpc, unsigned* out) {
  const int b = blockIdx.z, hg = blockIdx.y, sp = blockIdx.x;
  const int W = hpc * 16;               // 16-byte chunks per row piece (d128 bf16: 16 per head)
  const int T = NT / W;                 // tokens per pass
  const int chunk = threadIdx.x % W, trow = threadIdx.x / W;
  const int per = (L + splits - 1) / splits;
  const int start = sp * per, end = min(L, start + per);
  const int mask = (1 << log2bs) - 1;
  const long long rowb = (long long)hkv * 256;
  const long long off = (long long)hg * hpc * 256 + chunk * 16;
  const int nbp = L >> log2bs;
  u32 acc = 0;
  for (int t0 = start + trow; t0 < end; t0 += T * U) {
    uint4 kk[U], vv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      int t = min(t0 + u * T, end - 1);
      long long r = ((long long)bt[b * nbp + (t >> log2bs)] << log2bs) + (t & mask);
      const char* pk = kc + r * rowb + off; const char* pv = vc + r * rowb + off;
      asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                   : "=r"(kk[u].x), "=r"(kk[u].y), "=r"(kk[u].z), "=r"(kk[u].w) : "l"(pk));
      asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                   : "=r"(vv[u].x), "=r"(vv[u].y), "=r"(vv[u].z), "=r"(vv[u].w) : "l"(pv));
    }
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= kk[u].x ^ kk[u].w ^ vv[u].y ^ vv[u].z;
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}
'''
HKV, D = 8, 128  # the kernels above assume d 128 bf16: 16 chunks of 16 bytes per head and token


def launch(f, grid, block, args, shared_mem=0):
    """Launch a probe kernel on torch's current stream (so the CUDA-graph capture of `bench` records it)."""
    jit.launch(f, grid, block, args, torch.device("cuda"), shared_mem=shared_mem)


mods = {}


def kern(nt, u):
    if (nt, u) not in mods:
        mods[(nt, u)] = cp.RawModule(code=SRC, options=("-std=c++17", f"-DNT={nt}", f"-DU={u}")).get_function("readk")
    return mods[(nt, u)]


def paged_cases(B, L, g, dev):
    """For block sizes 16 and 64 and pages in random, then in order: (bs, order, k_cache, v_cache, flat block
    table), bf16 random values, B sequences of L tokens."""
    for bs in (16, 64):
        nb = B * L // bs
        kc = torch.randn(nb, bs, HKV, D, generator=g, device=dev).to(torch.bfloat16)
        vc = torch.randn(nb, bs, HKV, D, generator=g, device=dev).to(torch.bfloat16)
        for order in ("perm", "seq"):
            bt = torch.randperm(nb, generator=g, device=dev) if order == "perm" else torch.arange(nb, device=dev)
            yield bs, order, kc, vc, bt.to(torch.int32).contiguous()
        del kc, vc


def read_ldg(kc, vc, bt, B, L, bs, hpc, splits, nt, u, out):
    """TB/s of kern(nt, u) reading the batch with hpc kv heads per CTA and `splits` CTAs per sequence and head group."""
    f = kern(nt, u)
    args = (kc.data_ptr(), vc.data_ptr(), bt.data_ptr(), cp.int32(L), cp.int32(bs.bit_length() - 1), cp.int32(HKV),
            cp.int32(splits), cp.int32(hpc), out.data_ptr())
    kvb = 2 * B * L * HKV * D * 2
    return kvb / bench(fixed(launch, f, (splits, HKV // hpc, B), (nt,), args), reps=20) / 1e12


def cudnn(B, L, g, dev):
    """TB/s of SDPA CUDNN decode (GQA 32/8) over contiguous K/V of the same size."""
    kk = torch.randn(B, HKV, L, D, generator=g, device=dev).to(torch.bfloat16)
    vv = torch.randn(B, HKV, L, D, generator=g, device=dev).to(torch.bfloat16)
    qq = torch.randn(B, 32, 1, D, generator=g, device=dev).to(torch.bfloat16)

    def run(i):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)

    return 2 * B * L * HKV * D * 2 / bench(run) / 1e12


def main():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    out = torch.zeros(4, dtype=torch.int32, device=dev)
    for B, L in [(64, 1024), (64, 4096), (16, 16384)]:
        for bs, order, kc, vc, bt in paged_cases(B, L, g, dev):
            res = []
            for hpc in (1, 2, 8):
                for nt in (128, 256):
                    if hpc * 16 > nt:
                        continue
                    for u in (8, 16):
                        best = (0, 0)
                        for ctas_per_pair in (1, 2, 4, 8, 16):
                            splits = ctas_per_pair * hpc
                            if splits * (HKV // hpc) * B > 32 * sms or L // splits < 64:
                                continue
                            bw = read_ldg(kc, vc, bt, B, L, bs, hpc, splits, nt, u, out)
                            if bw > best[0]:
                                best = (bw, splits)
                        res.append(f"hpc{hpc}/nt{nt}/u{u} {best[0]:.3f}(s{best[1]})")
            print(f"B{B} L{L} bs{bs} {order}: " + "  ".join(res), flush=True)
        print(f"B{B} L{L} CUDNN {cudnn(B, L, g, dev):.3f}", flush=True)


if __name__ == "__main__":
    main()
