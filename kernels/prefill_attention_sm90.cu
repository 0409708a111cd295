// prefill_attention_sm90.cu: varlen causal flash attention over the paged KV cache on Hopper's warpgroup
// tensor cores (wgmma; build for sm_90a). Same contract and arguments as prefill_attention.cu, which serves
// every other GPU.
//
// Algorithm: persistent, one CTA per SM. The work items are (sequence, head, m-block of BM = 128 query rows),
// in the order sequence, head, m-block from the last (the m-blocks of a head run together, so they read the
// same K/V tiles from L2 rather than HBM; the longest-running first); a sequence's m-blocks past its queries
// are not items. A CTA takes its next item from a global counter (atomicAdd by one producer thread, which
// walks the sequences' m-block counts with a cursor, since its items only increase) and publishes it to its
// consumers through a 2-entry ring in shared memory with mbarriers; the last CTA to run out sets the counters
// back to zero for the next launch. Which CTA computes an item never changes its arithmetic: the output is
// the same as one CTA per item (the earlier grid launch) bit for bit. The producer runs up to two items
// ahead, so the next item's Q and first K tile load while the consumers finish the current one (against the
// grid launch, one CTA per item, this gains most at short sequences, where each item is short; figures in
// docs/benchmark-history.md, "Persistent schedule").
// A CTA has 3 warpgroups (warp-specialised):
//   producer (warpgroup 0, registers cut to PRODUCER_REGS by setmaxnreg): the warpgroup copies each item's Q
//     with cp.async into one of 2 Q slots (rows past the sequence zero-filled; "Q full" / "Q empty"
//     mbarriers per slot, the slot freed once the item's output is written), then one warp streams the
//     K/V tiles of BN = 128 tokens, one tile group ahead, into 128-byte-swizzled shared memory (wgmma.cuh's
//     layout) by TMA (cp.async.bulk.tensor): the paged cache is a 3-D tensor (head_dim, kv head, token row)
//     to the TMA unit, and a tile is one box per (page, 64-column panel), placed by the block table (16
//     boxes per tile at block size 16 and d = 128, 2 from block size 128 up). Each group's "full" mbarrier expects the
//     groups' bytes (expect_tx) and completes when they land; the producer waits only for a slot, on its
//     "empty" mbarrier. The one tile that holds the end of the context (when that is not a whole tile) is
//     copied row by row with cp.async instead, rows past the context zero-filled: a page's unused rows may
//     hold anything (NaN), which 0 * V would spread. TMA replaced an all-cp.async producer (128 threads
//     issuing 16-byte copies and page lookups on the SM's issue slots, beside the consumers), with the output
//     bit-identical (figures in docs/benchmark-history.md, "K/V by TMA").
//   2 consumers (warpgroups 1 and 2, CONSUMER_REGS registers): consumer w owns query rows 64w .. 64w + 63.
//     Query row i of sequence b sits at position context_len_b - q_len_b + i (bottom-right causal alignment)
//     and sees keys 0 .. that position. Tiles are visited from the last (the diagonal, masked) down to 0 (to
//     `first` with a sliding window, below).
//     Per tile t, software-pipelined one tile deep so that the softmax of tile t runs while the tensor
//     cores do the P.V product of tile t+1:
//       issue S_t = Q K_t^T                 wgmma m64n128k16 x D/16, A = Q and B = K from shared memory
//       issue O  += P_{t+1} V_{t+1}         wgmma m64nDk16 x BN/16, A = P from registers (bf16/fp16),
//                                           B = V from shared memory read N-major (transposed)
//       wait S_t; online softmax in float32, in place (masked scores -inf, exp2 with the scale folded into
//       one FMA, running max and sum per row)
//       wait P.V; release the tile group; pack P_t to 16 bits (only now: the in-flight product reads
//       P_{t+1}'s registers)
//     and O is rescaled by exp2(old max - new max), when some row's max moved (warp vote), just before the
//     next P.V product is issued. After the wait for Q, and for a group holding the cp.async tile, the
//     consumers fence the async proxy (those copies wrote through the generic one). The consumers share no
//     CTA barrier; they take turns at issuing their products (two named barriers, as FlashAttention-3's
//     ping-pong schedule, consumer 0 first in every item), so one's softmax runs while the other's products
//     do (measured faster than letting them drift).
// Sliding window (window > 0; 0: none): the row at position p sees keys (p - window, p] only. Scores below a
//   row's window are masked like those past the diagonal, and an item's tiles stop at `first`, the tile holding
//   its lowest window start (row 0's, position qoff + m0 - window + 1; 0 without a window): the tiles below
//   every row's window are neither loaded nor computed, so a long prompt costs O(window) per row.
// Tile groups: an item's group k = {K_{last-k}, V_{last-k+1}} (what consumer iteration t = last - k reads);
//   group 0 is K_last alone, group last - first + 1 is V_first alone. Groups are numbered across the CTA's
//   items (the producer and the consumers count them alike): group n uses slot n & 1 of the K ring, of the
//   V ring and of the full / empty mbarriers, phase (n >> 1) & 1.
// Shared memory: 2 Q slots (BM D 2 bytes each) + 2 K slots + 2 V slots (BN D 2 bytes each) + 1 KB for
//   1024-byte alignment: 193 KB at D = 128 (1 CTA per SM, 384 threads), 97 KB at D = 64.
// The tensor maps (flashgen/ops/tma.py) live in device memory, one per cache and box height, built once.
// Memory traffic: q and out once; K/V of tile t once per (query block, head) CTA, mostly from L2; HBM sees
//   about ctx * Hkv * D * 2 * sizeof(dtype) per sequence. FLOPs: 4 * D * (unmasked (query, key) pairs) per head.
#include "common.cuh"
#include "wgmma.cuh"

#ifndef FG_HEAD_DIM
#define FG_HEAD_DIM 128
#endif
#define D FG_HEAD_DIM
#define BM 128                        // query rows per CTA: 2 warpgroups x 64
#define BN 128                        // keys per tile
#define LOG2_BN 7
#define NTHREADS 384                  // producer + 2 consumer warpgroups
#ifndef PRODUCER_REGS
#define PRODUCER_REGS 56
#endif
#ifndef CONSUMER_REGS
#define CONSUMER_REGS 224             // 128 x 56 + 256 x 224 <= 65536
#endif
#define CH (D / 8)                    // 16-byte chunks per row
#define RSTEP (128 / CH)              // rows apart between one producer thread's chunks in a tile load
#define NLD (BN / RSTEP)              // chunks per producer thread per K (or V, or Q: BM == BN) tile
#define TILE_BYTES (BN * D * 2)
#define Q_BYTES (BM * D * 2)

// Head_dim 256 does not fit this scheme (2 Q + 2 K + 2 V slots of 128 x 256: 385 KB of shared memory; O of 64 rows x
// 256 per consumer warpgroup: 128 registers a thread): the wrapper sends it to prefill_attention.cu.
static_assert(D == 64 || D == 128, "prefill_attention_sm90: head_dim 64 or 128");
static_assert(BM == BN, "Q and K/V tiles share the load pattern");

#if D == 128
#define WGMMA_PV wgmma_rs_n128_tb
#else
#define WGMMA_PV wgmma_rs_n64_tb
#endif

FG_INLINE void mbar_init(u32 bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
FG_INLINE void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrive on the barrier once this thread's earlier cp.async copies have landed (the barrier's count includes
// this arrival: .noinc).
FG_INLINE void mbar_arrive_cp_async(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Arrive on the barrier once this thread's earlier cp.async copies have landed, counting the arrival itself
// (the pending count goes up by one now and down by one then).
FG_INLINE void mbar_arrive_cp_async_counted(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Arrive, and expect `bytes` more from asynchronous (TMA) copies before the phase completes.
FG_INLINE void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// TMA: the box at coordinates (c0, c1, c2) of a 3-D tensor map (in global memory) into shared memory at dst,
// counted on the mbarrier as bytes land.
FG_INLINE void tma_load_3d(u32 dst, const void* tmap, int c0, int c1, int c2, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(dst), "l"((u64)tmap), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}
// Wait until the phase of parity `parity` of the barrier has completed.
FG_INLINE void mbar_wait(u32 bar, int parity) {
    u32 done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    } while (!done);
}

// A work item: (sequence b, head h, m-block mb), taken in the order sequence, head, m-block from the last (the
// longest-running first), skipping the m-blocks past a sequence's queries.
struct Item {
    int b, h, mb;
};

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
prefill_attention_sm90_kernel(const scalar_t* __restrict__ q,        // (T, Hq, D)
                              const scalar_t* __restrict__ k_cache,  // (num_blocks, block_size, Hkv, D)
                              const scalar_t* __restrict__ v_cache,
                              const int* __restrict__ cu_seqlens_q,  // (B + 1,)
                              const int* __restrict__ context_lens,  // (B,)
                              const int* __restrict__ block_tables,  // (B, bt_stride)
                              int bt_stride,
                              scalar_t* __restrict__ out,            // (T, Hq, D)
                              int hq, int hkv, int log2_bs, float scale_log2, int batch,
                              const void* __restrict__ tmap_k,       // TMA maps of the caches (flashgen/ops/tma.py)
                              const void* __restrict__ tmap_v,
                              int* __restrict__ sched,               // 2 counters, zero between launches
                              int window) {                          // sliding window (0: none)
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // K/V full[2], K/V empty[2], Q full[2], Q empty[2], work full[2], work empty[2]
    __shared__ __align__(8) u64 bars[12];
    __shared__ Item s_item[2];
    const u32 raw = (u32)__cvta_generic_to_shared(smem_raw);
    const u32 s0 = (raw + 1023u) & ~1023u;  // the swizzle needs 1024-byte aligned tiles
    unsigned char* const gsm = smem_raw + (s0 - raw);
    // [Q slot 0] [Q slot 1] [K slot 0] [K slot 1] [V slot 0] [V slot 1], as offsets from s0
    constexpr u32 OQ = 0, OK = 2 * Q_BYTES, OV = 2 * Q_BYTES + 2 * TILE_BYTES;
    const u32 full0 = (u32)__cvta_generic_to_shared(&bars[0]), empty0 = full0 + 16, qfull0 = full0 + 32,
              qempty0 = full0 + 48, wfull0 = full0 + 64, wempty0 = full0 + 80;
    const int tid = threadIdx.x, wg = tid >> 7;
    const i64 q_row_stride = (i64)hq * D;

    if (tid == 0) {
        mbar_init(full0, 1);         // group landed: the producer's expect_tx arrival (+ its bytes, + its
        mbar_init(full0 + 8, 1);     //   lanes' cp.async arrivals for the tile holding the context's end)
        mbar_init(empty0, 256);      // group consumed: one arrival per consumer thread
        mbar_init(empty0 + 8, 256);
        mbar_init(qfull0, 128);      // Q landed: one arrival per producer thread
        mbar_init(qfull0 + 8, 128);
        mbar_init(qempty0, 256);     // Q slot free (its output written): one arrival per consumer thread
        mbar_init(qempty0 + 8, 256);
        mbar_init(wfull0, 1);        // work item published by the scheduling thread
        mbar_init(wfull0 + 8, 1);
        mbar_init(wempty0, 256);     // work item read by every consumer thread
        mbar_init(wempty0 + 8, 256);
    }
    __syncthreads();

    // Per item: its geometry (the same arithmetic in the producer and the consumers).
    auto item_geometry = [&](const Item& it, int& q_start, int& qlen, int& m0, int& ctx, int& qoff, int& last,
                             int& first, int& part) {
        q_start = cu_seqlens_q[it.b];
        qlen = cu_seqlens_q[it.b + 1] - q_start;
        m0 = it.mb * BM;
        ctx = context_lens[it.b];
        qoff = ctx - qlen;                              // position of query row 0 (contract: ctx >= qlen)
        // tiles last .. 0 this block can see; at least one, so that a context shorter than the queries (outside
        // the contract) gives garbage rows instead of an empty item the group counting does not expect
        last = max(ceil_div(min(ctx, qoff + m0 + BM), BN) - 1, 0);
        // the lowest tile a row of the block sees: row 0's window start (0 without a window)
        first = window > 0 ? min(max(qoff + m0 - window + 1, 0) >> LOG2_BN, last) : 0;
        part = (ctx & (BN - 1)) ? ctx / BN : -1;  // the tile holding the context's end, if not whole: by cp.async
    };

    if (wg == 0) {
        // ------------------------------------------------------------ producer
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
        const int lane = tid & 31;
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)tmap_k) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"((u64)tmap_v) : "memory");
        }
        // The scheduling thread's cursor: items [base, base + hq * nmb) belong to sequence cb.
        int cb = 0, base = 0, nmb = batch > 0 ? ceil_div(cu_seqlens_q[1] - cu_seqlens_q[0], BM) : 0;
        const int bs_mask = (1 << log2_bs) - 1;
        const int log2_r = min(log2_bs, LOG2_BN);  // rows per box: one page, or one tile of a longer page
        const int boxes = (BN >> log2_r) * (D / 64);
        u32 gi = 0;  // K/V groups issued so far: group gi uses slot gi & 1 of each ring
        for (int n = 0, qi = 0;; ++n) {
            const int ws = n & 1;
            if (tid == 0) {
                mbar_wait(wempty0 + 8 * ws, ((n >> 1) & 1) ^ 1);  // the consumers have read item n - 2
                const int w = atomicAdd(sched, 1);
                while (cb < batch && w >= base + hq * nmb) {
                    base += hq * nmb;
                    if (++cb < batch) nmb = ceil_div(cu_seqlens_q[cb + 1] - cu_seqlens_q[cb], BM);
                }
                Item it{-1, 0, 0};
                if (cb < batch) {
                    const int i = w - base;
                    it = Item{cb, i / nmb, nmb - 1 - i % nmb};
                } else if (__threadfence(), atomicAdd(sched + 1, 1) == (int)gridDim.x - 1) {
                    sched[0] = 0;  // every CTA has taken its last item: ready for the next launch
                    sched[1] = 0;
                }
                s_item[ws] = it;
                mbar_arrive(wfull0 + 8 * ws);
            }
            asm volatile("bar.sync 5, 128;\n" ::: "memory");  // the producer warps: s_item[ws] is written
            const Item it = s_item[ws];
            if (it.b < 0) break;
            int q_start, qlen, m0, ctx, qoff, last, first, part;
            item_geometry(it, q_start, qlen, m0, ctx, qoff, last, first, part);
            // Q (rows past the sequence zero-filled) with cp.async by the whole warpgroup, into Q slot qi & 1.
            {
                const int qs = qi & 1;
                mbar_wait(qempty0 + 8 * qs, ((qi >> 1) & 1) ^ 1);  // the output of item qi - 2 is written
                const int lch = tid % CH, lrow0 = tid / CH;
#pragma unroll 4
                for (int i = 0; i < NLD; ++i) {
                    const int row = lrow0 + i * RSTEP;
                    const bool valid = m0 + row < qlen;
                    const scalar_t* src =
                        q + (i64)(q_start + (valid ? m0 + row : 0)) * q_row_stride + it.h * D + lch * 8;
                    cp_async_16(gsm + OQ + qs * Q_BYTES + swz128(BM, row, lch), src, valid ? 16 : 0);
                }
                mbar_arrive_cp_async(qfull0 + 8 * qs);
                ++qi;
            }
            if (tid >= 32) continue;
            // K/V: one warp. A tile whose rows all hold context tokens comes by TMA, one box per (page, 64-column
            // panel); the tile holding the context's end (if it is not a whole tile) by cp.async, rows past the
            // context zero-filled (a page's unused rows may hold anything, even NaN, which 0 * V would spread).
            const int kvh = it.h / (hq / hkv);
            const int* bt = block_tables + (i64)it.b * bt_stride;
            auto tma_tile = [&](const void* tmap, u32 dst, int t, u32 bar) {
#pragma unroll 1
                for (int i = lane; i < boxes; i += 32) {
                    const int slot = i / (D / 64), pn = i % (D / 64);
                    const int tok = t * BN + (slot << log2_r);
                    const int row = (bt[tok >> log2_bs] << log2_bs) + (tok & bs_mask);
                    tma_load_3d(dst + pn * (BN * 128) + (slot << log2_r) * 128, tmap, pn * 64, kvh, row, bar);
                }
            };
            auto copy_tile = [&](const scalar_t* __restrict__ cache, u32 dst, int t) {
                const i64 kv_row_stride = (i64)hkv * D;
#pragma unroll 1
                for (int i = lane; i < BN * CH; i += 32) {
                    const int row = i / CH, ch = i % CH;
                    const int tok = min(t * BN + row, ctx - 1);
                    const i64 r = ((i64)bt[tok >> log2_bs] << log2_bs) + (tok & bs_mask);
                    cp_async_16(gsm + (dst - s0) + swz128(BN, row, ch),
                                cache + r * kv_row_stride + kvh * D + ch * 8, t * BN + row < ctx ? 16 : 0);
                }
            };
            // Group k of the item (k = 0 .. last - first + 1): K tile last - k (k <= last - first) and V tile
            // last - k + 1 (k >= 1), in slot (gi + k) & 1 of the K and V rings. The cp.async arrivals count
            // themselves (no .noinc) and come before the expect_tx arrival, so the phase cannot complete before
            // every copy is counted.
            for (int k = 0; k <= last - first + 1; ++k, ++gi) {
                const int tk = k <= last - first ? last - k : -1, tv = k >= 1 ? last - k + 1 : -1;
                const u32 slot = gi & 1, bar = full0 + 8 * slot;
                mbar_wait(empty0 + 8 * slot, ((gi >> 1) & 1) ^ 1);  // group gi - 2 (same slots) consumed
                const bool ck = tk >= 0 && tk == part, cv = tv >= 0 && tv == part;
                const u32 kd = s0 + OK + slot * TILE_BYTES, vd = s0 + OV + slot * TILE_BYTES;
                if (ck) copy_tile(k_cache, kd, tk);
                if (cv) copy_tile(v_cache, vd, tv);
                if (ck || cv) mbar_arrive_cp_async_counted(bar);
                __syncwarp();
                if (lane == 0) mbar_arrive_expect_tx(bar, ((tk >= 0 && !ck) + (tv >= 0 && !cv)) * TILE_BYTES);
                __syncwarp();
                if (tk >= 0 && !ck) tma_tile(tmap_k, kd, tk, bar);
                if (tv >= 0 && !cv) tma_tile(tmap_v, vd, tv, bar);
            }
        }
        cp_async_wait<0>();
        return;
    }

    // ---------------------------------------------------------------- consumers
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));
    const int cw = wg - 1, wl = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, c = lane & 3;

    float s[BN / 2];          // S accumulators: rows g, g + 8 of the warp's 16, BN / 8 column groups
    float o[D / 2];           // O accumulators, same layout over D columns
    u32 pa[BN / 16][4];       // P as A fragments, packed from s once the P.V product reading them is done
    u32 gi = 0;               // K/V groups consumed so far (the producer's numbering)

    // Tensor-core turns (named barriers 1 and 2, both consumers' 256 threads): a consumer issues its products
    // only after the other one has issued its own, so that one's softmax runs while the other's products do.
    auto turn_wait = [&]() { asm volatile("bar.sync %0, 256;\n" ::"r"(1 + cw) : "memory"); };
    auto turn_pass = [&]() { asm volatile("bar.arrive %0, 256;\n" ::"r"(2 - cw) : "memory"); };

    for (int n = 0, qi = 0;; ++n, ++qi) {
        const int ws = n & 1;
        mbar_wait(wfull0 + 8 * ws, (n >> 1) & 1);
        const Item it = s_item[ws];
        mbar_arrive(wempty0 + 8 * ws);
        if (it.b < 0) break;
        int q_start, qlen, m0, ctx, qoff, last, first, part;
        item_geometry(it, q_start, qlen, m0, ctx, qoff, last, first, part);
        const int h = it.h;
        const int qs = qi & 1;

#pragma unroll
        for (int i = 0; i < BN / 2; ++i) s[i] = 0.f;
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
        float mr[2] = {FG_NEG_INF, FG_NEG_INF}, lr[2] = {0.f, 0.f};  // running max / per-lane sum, rows g, g + 8
        float al[2] = {1.f, 1.f};  // O's pending rescale factors (from the latest softmax)
        const int p0 = qoff + m0 + cw * 64 + wl * 16 + g;           // position of row g (row g + 8: p0 + 8)
        const int wg_first = qoff + m0 + cw * 64;                   // position of the warpgroup's first row
        const u32 q_addr = s0 + OQ + qs * Q_BYTES + cw * 64 * 128;

        auto issue_qk = [&](u32 slot) {
            const u32 k_addr = s0 + OK + slot * TILE_BYTES;
#pragma unroll
            for (int ks = 0; ks < D / 16; ++ks)
                wgmma_ss_n128(s, smem_desc(q_addr + (ks >> 2) * (BM * 128) + (ks & 3) * 32, 16, 1024),
                              smem_desc(k_addr + (ks >> 2) * (BN * 128) + (ks & 3) * 32, 16, 1024), ks > 0);
        };
        auto issue_pv = [&](u32 slot) {
            const u32 v_addr = s0 + OV + slot * TILE_BYTES;
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk)
                WGMMA_PV(o, pa[kk], smem_desc(v_addr + kk * 16 * 128, BN * 128, 1024), 1);
        };
        // Mask S_t (key j is visible to the row at position p iff j <= p and j < ctx, and j > p - window with a
        // window), then the online softmax, in place: s becomes the unnormalised probabilities, al the factors
        // that rescale O.
        auto softmax = [&](int t) {
            const bool win_mask = window > 0 && t * BN <= wg_first + 63 - window;  // some row's window starts
            if (t * BN + BN - 1 > wg_first || t * BN + BN > ctx || win_mask) {     //   past the tile's first key
#pragma unroll
                for (int i = 0; i < BN / 8; ++i) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int j = t * BN + i * 8 + 2 * c + (e & 1);
                        const int p = p0 + (e >> 1) * 8;
                        if (j > p || j >= ctx || (win_mask && j <= p - window)) s[4 * i + e] = FG_NEG_INF;
                    }
                }
            }
            online_softmax_m16<BN / 8>(s, scale_log2, mr, lr, al);
        };
        // P (s) -> A fragments. Only once no P.V product is in flight: the compiler sees pa consumed when the
        // wgmma is issued, and would otherwise hand its registers to other values while the tensor cores still
        // read them (ptxas then serialises every wgmma).
        auto pack_p = [&]() {
#pragma unroll
            for (int i = 0; i < BN / 8; ++i) {
                pa[i / 2][(i & 1) * 2] = pack2(s[4 * i], s[4 * i + 1]);
                pa[i / 2][(i & 1) * 2 + 1] = pack2(s[4 * i + 2], s[4 * i + 3]);
            }
        };
        // Group k of the item holds K tile last - k and V tile last - k + 1; it is the producer's group gi + k.
        auto group_landed = [&](int k) {
            const u32 gk = gi + k;
            mbar_wait(full0 + 8 * (gk & 1), (gk >> 1) & 1);
            // cp.async wrote through the generic proxy; wgmma reads through the async one (TMA writes are async)
            if (last - k == part || last - k + 1 == part) fence_proxy_async();
        };
        auto release = [&](int k) { mbar_arrive(empty0 + 8 * ((gi + k) & 1)); };

        if (cw == 1) turn_pass();  // consumer 0 goes first
        // Tile last: S only (there is no P.V to overlap yet).
        mbar_wait(qfull0 + 8 * qs, (qi >> 1) & 1);
        fence_proxy_async();
        group_landed(0);
        turn_wait();
        wgmma_fence();
        issue_qk(gi & 1);
        wgmma_commit();
        turn_pass();
        wgmma_wait<0>();
        fence_regs(s);
        release(0);
        softmax(last);  // O is still 0: its rescale is a no-op
        pack_p();

        for (int k = 1; k <= last - first; ++k) {
            const int t = last - k;
            const u32 slot = (gi + k) & 1;
            group_landed(k);  // K_t and V_{t+1}
            rescale_rows_m16<D / 8>(o, al);  // to tile t + 1's max, which P_{t+1} is relative to
            turn_wait();
            wgmma_fence();
            issue_qk(slot);
            wgmma_commit();
            issue_pv(slot);
            wgmma_commit();
            turn_pass();
            wgmma_wait<1>();  // S_t done (groups complete in order), P.V may still run
            fence_regs(s);
            softmax(t);
            wgmma_wait<0>();
            fence_regs(o);
            release(k);
            pack_p();
        }
        group_landed(last - first + 1);  // V_first
        rescale_rows_m16<D / 8>(o, al);
        turn_wait();
        wgmma_fence();
        issue_pv((gi + last - first + 1) & 1);
        wgmma_commit();
        if (cw == 0) turn_pass();  // consumer 1's last turn of the item
        wgmma_wait<0>();
        fence_regs(o);
        release(last - first + 1);
        gi += last - first + 2;

        // Epilogue: normalise; stage the warpgroup's 64 rows in its own part of the Q slot (its wgmma reads of
        // Q are complete), then write 16-byte chunks and free the slot.
        float inv[2];
        softmax_inverse_m16(lr, inv);
        const u32 oq = OQ + qs * Q_BYTES;
        const int r0 = cw * 64 + wl * 16 + g;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
            *reinterpret_cast<u32*>(gsm + oq + swz128(BM, r0, i) + 4 * c) =
                pack2(o[4 * i] * inv[0], o[4 * i + 1] * inv[0]);
            *reinterpret_cast<u32*>(gsm + oq + swz128(BM, r0 + 8, i) + 4 * c) =
                pack2(o[4 * i + 2] * inv[1], o[4 * i + 3] * inv[1]);
        }
        asm volatile("bar.sync %0, 128;\n" ::"r"(cw + 3) : "memory");  // this warpgroup's 4 warps only
#pragma unroll
        for (int i = 0; i < 64 * CH / 128; ++i) {
            const int idx = (tid & 127) + 128 * i;
            const int row = cw * 64 + idx / CH, ch = idx % CH;
            const int qrow = m0 + row;
            if (qrow < qlen)
                st_v4(out + (i64)(q_start + qrow) * q_row_stride + h * D + ch * 8,
                      *reinterpret_cast<const uint4*>(gsm + oq + swz128(BM, row, ch)));
        }
        mbar_arrive(qempty0 + 8 * qs);
    }
}
