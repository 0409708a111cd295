"""What reading the paged cache costs, without attention: a CuPy kernel that reads every K/V byte of a decode
batch through the block table with 16-byte `ld.global.nc.L1::no_allocate.L2::256B` loads (the decode kernel's)
and computes nothing. hpc = kv heads per CTA: 1 is the decode kernel's pattern (one head's 256-byte piece of each
token row, rows 2 KB apart), 8 reads whole token rows (all heads, contiguous). Best of several CTA counts, 128
or 256 threads, 8 or 16 loads in flight per thread; random and in-order pages; GQA 32/8, d 128, bf16; TB/s
(K+V bytes / time, CUDA-graph replays), SDPA CUDNN on contiguous K/V last.
  PYTHONPATH=. python3 scripts/decode_read_probe.py"""
import cupy as cp
import torch

from flashgen.bench.kernels import _sdpa
from flashgen.ops import jit
from flashgen.ops.timing import bench

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
      asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(kk[u].x), "=r"(kk[u].y), "=r"(kk[u].z), "=r"(kk[u].w) : "l"(pk));
      asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(vv[u].x), "=r"(vv[u].y), "=r"(vv[u].z), "=r"(vv[u].w) : "l"(pv));
    }
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= kk[u].x ^ kk[u].w ^ vv[u].y ^ vv[u].z;
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}
'''
def _stream():
    return jit._external_stream(torch.cuda.current_stream().cuda_stream, torch.cuda.current_device())


mods = {}
def kern(nt, u):
    if (nt, u) not in mods:
        mods[(nt, u)] = cp.RawModule(code=SRC, options=("-std=c++17", f"-DNT={nt}", f"-DU={u}")).get_function("readk")
    return mods[(nt, u)]

def main():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    hkv, d = 8, 128
    out = torch.zeros(4, dtype=torch.int32, device=dev)
    for B, L in [(64, 1024), (64, 4096), (16, 16384)]:
        kvb = 2 * B * L * hkv * d * 2
        for bs in (16, 64):
            nb = B * L // bs
            kc = torch.randn(nb, bs, hkv, d, generator=g, device=dev).to(torch.bfloat16)
            vc = torch.randn(nb, bs, hkv, d, generator=g, device=dev).to(torch.bfloat16)
            lg = bs.bit_length() - 1
            for order in ("perm", "seq"):
                bt = (torch.randperm(nb, generator=g, device=dev) if order == "perm" else torch.arange(nb, device=dev)).to(torch.int32).contiguous()
                res = []
                for hpc in (1, 2, 8):
                    for nt in (128, 256):
                        if hpc * 16 > nt: continue
                        for u in (8, 16):
                            best = (0, 0)
                            for ctas_per_pair in (1, 2, 4, 8, 16):
                                splits = ctas_per_pair * hpc
                                grid = (splits, hkv // hpc, B)
                                if splits * (hkv // hpc) * B > 8 * 132 * 4 or L // splits < 64: continue
                                f = kern(nt, u)
                                args = (kc.data_ptr(), vc.data_ptr(), bt.data_ptr(), cp.int32(L), cp.int32(lg), cp.int32(hkv), cp.int32(splits), cp.int32(hpc), out.data_ptr())
                                def run(i):
                                    f(grid, (nt,), args, stream=_stream())
                                bw = kvb / bench(run, reps=20) / 1e12
                                if bw > best[0]: best = (bw, splits)
                            res.append(f"hpc{hpc}/nt{nt}/u{u} {best[0]:.3f}(s{best[1]})")
                print(f"B{B} L{L} bs{bs} {order}: " + "  ".join(res), flush=True)
            del kc, vc
        kk = torch.randn(B, hkv, L, d, generator=g, device=dev).to(torch.bfloat16)
        vv = torch.randn(B, hkv, L, d, generator=g, device=dev).to(torch.bfloat16)
        qq = torch.randn(B, 32, 1, d, generator=g, device=dev).to(torch.bfloat16)
        r = _sdpa("CUDNN_ATTENTION")
        print(f"B{B} L{L} CUDNN {kvb / bench(lambda i: r(qq, kk, vv, False)) / 1e12:.3f}", flush=True)
        del kk, vv

if __name__ == '__main__':
    main()
