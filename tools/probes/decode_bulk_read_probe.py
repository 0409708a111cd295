"""What reading the paged cache costs with Hopper's bulk copies (cp.async.bulk into shared memory, counted on
mbarriers, one issuing thread per CTA, ns buffers of one 16-token step each), without attention, next to
decode_read_probe.py's 16-byte loads (hpc 1, 256 threads, 16 loads in flight). hpc = kv heads per CTA: 1 and 2
copy each token row's piece separately (256 / 512 bytes), 8 copies the step's whole rows (32 KB of K and 32 KB
of V in one copy each). Best of several CTA counts; random and in-order pages; GQA 32/8, d 128, bf16; TB/s,
SDPA CUDNN on contiguous K/V last. Needs a Hopper GPU.
  PYTHONPATH=. python3 tools/probes/decode_bulk_read_probe.py"""
import cupy as cp
import torch

from decode_read_probe import HKV, D, cudnn, launch, paged_cases, read_ldg  # this folder (sys.path[0])
from flashgen.ops.timing import bench, fixed

SRC = r'''
typedef unsigned int u32; typedef unsigned long long u64;
__device__ __forceinline__ void cp_bulk(u32 dst, const void* src, u32 n, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(dst), "l"(src), "r"(n), "r"(bar) : "memory");
}
__device__ __forceinline__ void wait(u32 bar, int par) {
  u32 done; do { asm volatile("{.reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0,1,0,p;}"
      : "=r"(done) : "r"(bar), "r"(par) : "memory"); } while (!done);
}
extern "C" __global__ void readbulk(const char* __restrict__ kc, const char* __restrict__ vc,
    const int* __restrict__ bt, int L, int log2bs, int hkv, int splits, int hpc, int ns, unsigned* out) {
  extern __shared__ __align__(128) unsigned char sm[];
  __shared__ __align__(8) u64 bars[16];
  if (threadIdx.x != 0) return;
  const int b = blockIdx.z, hg = blockIdx.y, sp = blockIdx.x;
  const int per = ((L + splits - 1) / splits + 15) & ~15;
  const int start = sp * per, end = min(L, start + per);
  const int mask = (1 << log2bs) - 1, nbp = L >> log2bs;
  const long long rowb = (long long)hkv * 256, hb = hpc * 256;
  const u32 sb = 2 * 16 * hb;
  const u32 s0 = (u32)__cvta_generic_to_shared(sm), b0 = (u32)__cvta_generic_to_shared(bars);
  for (int s = 0; s < ns; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(b0 + 8 * s));
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  const int nsteps = end > start ? (end - start) / 16 : 0;
  for (int i = 0; i < nsteps; ++i) {
    const int s = i % ns; const u32 bar = b0 + 8 * s;
    if (i >= ns) wait(bar, ((i / ns) - 1) & 1);
    const int t = start + 16 * i;
    const long long r = ((long long)bt[b * nbp + (t >> log2bs)] << log2bs) + (t & mask);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(sb) : "memory");
    const u32 dst = s0 + s * sb;
    if (hpc == hkv) {
      cp_bulk(dst, kc + r * rowb, 16 * rowb, bar); cp_bulk(dst + 16 * rowb, vc + r * rowb, 16 * rowb, bar);
    } else {
      for (int j = 0; j < 16; ++j) {
        cp_bulk(dst + j * hb, kc + (r + j) * rowb + hg * hb, hb, bar);
        cp_bulk(dst + (16 + j) * hb, vc + (r + j) * rowb + hg * hb, hb, bar);
      }
    }
  }
  for (int i = max(0, nsteps - ns); i < nsteps; ++i) wait(b0 + 8 * (i % ns), (i / ns) & 1);
  if (nsteps < 0) out[0] = 1;
}
'''
bulk = cp.RawModule(code=SRC, options=("-std=c++17", "-arch=sm_90a")).get_function("readbulk")
bulk.max_dynamic_shared_size_bytes = 200 * 1024


def main():
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    out = torch.zeros(4, dtype=torch.int32, device=dev)
    for B, L in [(64, 4096), (16, 16384)]:
        kvb = 2 * B * L * HKV * D * 2
        for bs, order, kc, vc, bt in paged_cases(B, L, g, dev):
            best = max((read_ldg(kc, vc, bt, B, L, bs, 1, splits, 256, 16, out), splits) for splits in (2, 4, 8, 16))
            res = [f"ldg hpc1 {best[0]:.3f}(s{best[1]})"]
            for hpc, nss in ((1, (4, 8, 12)), (2, (4, 6)), (8, (2, 3))):
                for ns in nss:
                    smem = ns * 2 * 16 * hpc * 256
                    best = (0, 0)
                    for cpp in (1, 2, 4, 8, 16):
                        splits = cpp * hpc
                        if L // splits < 64:
                            continue
                        args = (kc.data_ptr(), vc.data_ptr(), bt.data_ptr(), cp.int32(L), cp.int32(bs.bit_length() - 1),
                                cp.int32(HKV), cp.int32(splits), cp.int32(hpc), cp.int32(ns), out.data_ptr())
                        bw = kvb / bench(fixed(launch, bulk, (splits, HKV // hpc, B), (32,), args, shared_mem=smem),
                                         reps=20) / 1e12
                        best = max(best, (bw, splits))
                    res.append(f"bulk hpc{hpc} ns{ns} {best[0]:.3f}(s{best[1]})")
            print(f"B{B} L{L} bs{bs} {order}: " + "  ".join(res), flush=True)
        print(f"B{B} L{L} CUDNN {cudnn(B, L, g, dev):.3f}", flush=True)


if __name__ == "__main__":
    main()
