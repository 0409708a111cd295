// wgmma.cuh: Hopper warpgroup matrix products (sm_90a only: include it from kernels built for that target).
//
// A warpgroup (4 consecutive warps, the first one's index a multiple of 4) issues wgmma.mma_async together.
// Operands in shared memory are named by 64-bit descriptors (smem_desc); A may come from registers instead,
// in the m16n8k16 A-fragment layout per warp (warp w of the group owns rows 16w .. 16w + 15). The fp32
// accumulators follow the m16n8 C layout per warp: d[4i + e] = D[16w + g + 8 (e >> 1)][8i + 2c + (e & 1)],
// lane = 4g + c. PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Instructions".
//
// Shared-memory layout used with these helpers (128-byte swizzle): a tile of R rows is stored as panels of
// 64 two-byte columns; panel p holds rows 0 .. R-1, 128 bytes each, and the 16-byte chunk ch (0..7) of row r
// sits at chunk position ch ^ (r & 7). Every panel starts at a multiple of 1024 bytes (the swizzle pattern
// repeats every 8 rows and the hardware applies it to the absolute address).
//   K-major operand (rows = M or N, columns = K): start = panel + 32 * (k-step within the panel), SBO = 1024
//     (8 rows to the next 8), LBO unused (16).
//   MN-major operand (rows = K, columns = N): start = panel 0 + 128 * (first K row), SBO = 1024 (8 K rows to
//     the next 8), LBO = panel stride (64 columns to the next 64).
#pragma once

#include "common.cuh"

FG_INLINE u64 smem_desc(u32 smem_addr, u32 lbo, u32 sbo) {
    return (u64)((smem_addr & 0x3FFFF) >> 4) | ((u64)((lbo >> 4) & 0x3FFF) << 16) |
           ((u64)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);  // bits 62-63 = 1: 128-byte swizzle
}
// Byte offset of 16-byte chunk ch of row `row` in a swizzled tile of `rows` rows (layout above).
FG_INLINE u32 swz128(int rows, int row, int ch) {
    return (u32)((((ch >> 3) * rows + row) << 7) + (((ch & 7) ^ (row & 7)) << 4));
}

FG_INLINE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
FG_INLINE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
FG_INLINE void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Shared memory written by the generic proxy (st.shared, cp.async) that wgmma reads next: each writing
// thread fences after its writes completed, before the barrier that publishes them.
FG_INLINE void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keep the compiler from moving accesses of wgmma accumulators across the asynchronous issue / wait points.
template <int N>
FG_INLINE void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// The instructions, one accumulator width each. Operand lists: FG_ACC32 / FG_ACC64 bind d[0 ..] as
// read-write floats, FG_D32 / FG_D64 are their placeholders %0 ...; the inputs follow them.
#define FG_ACC8(i) \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
        "+f"(d[i + 7])
#define FG_ACC32 FG_ACC8(0), FG_ACC8(8), FG_ACC8(16), FG_ACC8(24)
#define FG_ACC64 FG_ACC32, FG_ACC8(32), FG_ACC8(40), FG_ACC8(48), FG_ACC8(56)
#define FG_R0_31 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define FG_R32_63 \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define FG_D32 "{" FG_R0_31 "}"
#define FG_D64 "{" FG_R0_31 ", " FG_R32_63 "}"
#define FG_WGMMA(n) "wgmma.mma_async.sync.aligned.m64n" #n "k16.f32." FG_MMA_TYPE "." FG_MMA_TYPE " "
// scale-d (accumulate or overwrite D) is a predicate operand, set from the last input
#define FG_SCALE_D(k) "{\n.reg .pred p;\nsetp.ne.b32 p, %" #k ", 0;\n"

// D (64 x 128) = A (64 x 16, shared memory, K-major) * B (16 x 128, shared memory, K-major) [+ D]
FG_INLINE void wgmma_ss_n128(float* d, u64 desc_a, u64 desc_b, int accumulate) {
    asm volatile(FG_SCALE_D(66) FG_WGMMA(128) FG_D64 ", %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : FG_ACC64
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
// D (64 x 64) = A (64 x 16, registers) * B (16 x 64, shared memory, MN-major: trans-b = 1) [+ D]
FG_INLINE void wgmma_rs_n64_tb(float* d, const u32* a, u64 desc_b, int accumulate) {
    asm volatile(FG_SCALE_D(37) FG_WGMMA(64) FG_D32 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                 : FG_ACC32
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}
// D (64 x 128) = A (64 x 16, registers) * B (16 x 128, shared memory, MN-major: trans-b = 1) [+ D]
FG_INLINE void wgmma_rs_n128_tb(float* d, const u32* a, u64 desc_b, int accumulate) {
    asm volatile(FG_SCALE_D(69) FG_WGMMA(128) FG_D64 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : FG_ACC64
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}
