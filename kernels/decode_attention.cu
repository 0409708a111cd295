// decode_attention.cu: paged decode attention (one new query token per sequence), GQA-aware, split-KV, with
// the work planned in the kernel from the context lengths.
//
// Algorithm (FlashDecoding with the GQA group on the tensor cores):
//   The work is a set of pairs p = (sequence b, head group j): kv head j / ceil(G / 8) and up to 8 of the
//   G = Hq / Hkv query heads that share it, over ceil(ctx_b / 16) 16-token steps (fewer with a sliding
//   window, below). The grid is num_splits CTAs per pair (4 warps each), and one of two plans (a third below)
//   shares the steps out (identical in every CTA, no host sync, no planning launch; the result depends on the context
//   lengths only, never on timing):
//   - split: CTA i takes piece i % num_splits of pair i / num_splits, each pair cut in num_splits pieces of
//     equal whole steps (multiples of 4). No CTA looks at another sequence's length. Chosen when the mean
//     non-empty context is within 5% of the longest, when the batch comes longest first (the engine sorts
//     it so) and no piece is longer than 1.25x one resident CTA's share of the work (CTAs are dispatched in
//     order: longest-processing-time-first scheduling), and by the wrapper when the grid is over two waves.
//   - balanced: the steps of all pairs laid end to end (b-major) are cut into gridDim.x equal slices, slice
//     i on CTA i, which may end inside one pair and cover others whole. In a ragged batch every CTA then has
//     the same work, where the split plan leaves the long sequences' CTAs running alone at the end (figures
//     in docs/benchmark-history.md, "Decode plans"). Every warp scans the context lengths itself, 32 at a
//     time (warp reductions and a shuffle scan, no block barrier).
//   - warp (plan 3; D = 64 and 128; its own variant, FG_WARP_PLAN=1): the grid is ceil(pairs / 4) CTAs and warp
//     w of CTA i takes pair 4 i + w whole, all its steps, and writes the output from its own registers (no merge
//     of warps, no barrier, no partials): for a full batch of short contexts, where the split plan gives each
//     warp three or four steps between the prologue's dependent loads and the merge. The host's auto takes it
//     there (cuda_attention.py, WARP_AUTO_*: the longest context and the pairs per SM).
//   Every K/V element is read from HBM once per step, whatever G (G > 8 re-reads it once per 8 heads).
//   Within a piece of a pair the warps take 16-token steps in turn (warp w: steps w, w + 4, ...; D = 256: warp
//   pairs, below).
//   A step is two m16n8k16 passes:
//     S^T (16 tokens x 8 heads) = K (16 x D) . Q^T (D x 8)     A = K straight from global memory, B = Q
//     O^T (D x 8 heads)       += V^T (D x 16) . P^T (16 x 8)    A = V^T built in registers, B = P^T
//   with an online softmax per head in float32 (exp2, scale folded in). K and V are loaded with 16-byte
//   loads straight into fragment registers: the head dimension is permuted consistently on both sides of
//   each product (a dot product does not care about the order of its terms), so no shared memory, no
//   ldmatrix; V^T's token pairs are formed with byte permutes and P^T with movmatrix. The next step's
//   K/V loads (read-only, no L1 allocation, 256-byte L2 fetches) and the page-table read of the step
//   after are issued before the current step's math.
//   NOTE: a step never crosses a page: steps start at multiples of 16 tokens and block_size is a power of
//   two >= 16. Tokens past the piece's end are clamped to its last token (valid memory) and masked.
//   At the end of a piece the 4 warps merge (m, l, O) through shared memory. A CTA that covers a whole pair
//   writes the output (and the LSE); otherwise it writes a float32 partial O and its LSE (slot 2 i, or
//   2 i + 1 for a balanced slice's last piece when its first piece is another pair), counts itself done on
//   the pair's counter, and the last of the pair's CTAs to finish merges the partials in slice order (no
//   second kernel: at batch 1 a separate combine kernel took more than half the attention's own time).
//   A sequence with an empty context gets zeros and LSE -inf.
// Sliding window (window > 0; 0: none): the new token of sequence b sits at ctx_b - 1 and sees tokens
//   [lo_b, ctx_b), lo_b = max(0, ctx_b - window). Its steps start at the one holding lo_b (lo_b rounded down
//   to 16; the tokens below lo_b are masked like those past the end), and both plans count steps from there
//   (seq_steps: the split plan's pieces, the balanced plan's scans), so a long context costs O(window).
//   Not with a shared-prefix launch (the wrapper refuses the pair; there it would apply to each launch).
// Tiles: 16 tokens x D per warp step, 8 heads per CTA; registers only (the merge uses 16 KB of shared
//   memory at D = 128).
// D = 256 (Gemma 3): one step's K and V alone would take 128 registers per thread, twice with the next step's
//   loads in flight (it spilled). So two warps share each step, each on one half of the head dims (DH = D / 2
//   = 128): each loads its half of the step's K and V, computes its half of S^T = K . Q^T, and the two add
//   their halves through shared memory (one named barrier per warp pair and step, two exchange slots by step
//   parity); float addition commutes, so both hold the same S^T and so the same softmax, and each accumulates
//   O^T for its half of the dims. A thread then holds exactly what it holds at D = 128 (same registers); the
//   4 warps walk the steps as 2 pairs (pair w: steps w, w + 2, ...), and the merge is over the 2 pairs
//   (16 KB of shared memory for O, 2 KB for the exchange). D = 64 and 128 are compiled as before.
// Memory traffic: K and V of every context token once (2 * ctx * Hkv * D * sizeof(dtype) per sequence),
//   plus q, the block tables, the context lengths (the balanced plan: all of them per CTA, L2 hits) and,
//   for pairs cut between CTAs, 4 * (D + 1) bytes per piece and head written and re-read.
// Shared-prefix (cascade) decode: sequences that share their leading KV blocks (the n samples of one prompt,
//   prompts behind one cached system prompt) attend in two launches of this kernel, so the shared blocks are
//   read once per group instead of once per sequence:
//   1. q_rows (NG, q_group): a "sequence" b of the launch is a group; its query heads are the group's members'
//      heads, laid kv-head major (head h: kv head h / (q_group * r), member (h % (q_group * r)) / r, query head
//      kv head * r + h % r, with r = Hq / Hkv of the model), so the GQA machinery above reads each K/V element
//      once per 8 of them. q and the output (and LSE) are addressed through q_rows (-1: padding, skipped); the
//      context is the group's shared prefix; the output is written in float32 (out_f32).
//   2. bt_offset (B,): each sequence skips its group's shared blocks (context_lens are the lengths past them),
//      and merge_o / merge_lse (the first launch's output and natural-log LSE, LSE -inf where a sequence has
//      no group) are merged into the output as it is written: out = (O1 w1 + O2 w2) / (w1 + w2), w = e^(LSE -
//      max). No third kernel; one read of the first launch's output. FG_MERGE_N=1: the first launch was
//      prefill_attention.cu's PF_SHARED kernel, whose key splits leave merge_n states (an extra argument),
//      merged one after the other the same way.
// FG_KV_FP8=1: the cache is float8 e4m3 (fp8.cuh). A thread loads the same elements as 8-byte chunks and
//   converts them to the activation dtype when its step's math begins (the loads of the next step stay in
//   flight); K's scale is folded into scale_log2 by the wrapper, V's multiplies the output (v_scale).
// FG_KV_FP8=2, the int8k cache (fp8.cuh): K int8 and V e4m3, each with a float32 scale per token and kv head
//   (k_scales, v_scales: (num_blocks * block_size, Hkv), the cache's slots). K and V are loaded as with FP8
//   (int8 pairs become scalars exactly through a magic-number trick, s8x8_to_scalar8); with each step's K/V
//   a lane loads the K and V scales of its two tokens g and g + 8 (the rows of S^T it holds), 4 floats, issued
//   with the next step's loads. K's scale multiplies the token's raw score with the softmax scale (s = q.k_int8 *
//   ks * scale_log2, before the max), and V's the token's probabilities fed to P.V, not the row sums. There the
//   factor is vs * 448 (the head's V amax: a probability times a scale of ~1e-5 would be subnormal in float16)
//   and the wrapper passes v_scale = 1 / 448 for the output. The tokens masked to -inf (past the end, below a
//   window) have p = 0 whatever scale they read (clamped tokens read a valid slot's).
//   Memory traffic: K and V 1 byte per element plus 4 + 4 bytes of scales per token and kv head.
#include "common.cuh"

#ifndef FG_KV_FP8
#define FG_KV_FP8 0
#endif
#define FG_KV_INT8K (FG_KV_FP8 == 2)
#if FG_KV_FP8
#include "fp8.cuh"
typedef fp8_t kv_t;
typedef uint2 kvw_t;  // one load: 8 elements
FG_INLINE kvw_t ld_kv(const kv_t* p) { return ld_v2_stream(p); }
#if FG_KV_INT8K
FG_INLINE uint4 k_expand(const kvw_t& w) { return s8x8_to_scalar8(w); }
#else
FG_INLINE uint4 k_expand(const kvw_t& w) { return e4m3x8_to_scalar8(w); }
#endif
FG_INLINE uint4 v_expand(const kvw_t& w) { return e4m3x8_to_scalar8(w); }
#else
typedef scalar_t kv_t;
typedef uint4 kvw_t;
FG_INLINE kvw_t ld_kv(const kv_t* p) { return ld_v4_stream(p); }
FG_INLINE uint4 k_expand(const kvw_t& w) { return w; }
FG_INLINE uint4 v_expand(const kvw_t& w) { return w; }
#endif

#ifndef FG_HEAD_DIM
#define FG_HEAD_DIM 128
#endif
#ifndef FG_MERGE_N
#define FG_MERGE_N 0  // 1: the merged state has merge_n parts (see the shared-prefix notes above)
#endif
#ifndef FG_MERGE_MAX
#define FG_MERGE_MAX 8  // FG_MERGE_N: the most parts (cuda_attention.SHARED_MAX_SPLITS)
#endif
#define D FG_HEAD_DIM
#define DEC_WARPS 4
#define DEC_HEADS 8                // query heads per CTA: the mma's n
#define DEC_STEP 16                // tokens per warp step: the mma's m
#define DEC_MIN_SLICE 16           // fewest steps of a balanced slice (4 per warp)
#define DEC_SPLIT_D (D == 256 ? 2 : 1)  // warps sharing one step, each on DH of the head dims (see the top)
#define DH (D / DEC_SPLIT_D)
#define DEC_WALKERS (DEC_WARPS / DEC_SPLIT_D)  // warps (D = 256: warp pairs) taking steps in turn
#ifndef FG_WARP_PLAN
#define FG_WARP_PLAN 0              // 1: plan 3 (one warp per pair), a variant of its own (D = 64 and 128), so that
#endif                              //   the other plans' kernel carries none of its code (see the kernel)
#define KCH (DH / 32)              // 16-byte K chunks per token per thread
#define VCH (DH / 64)              // 16-byte V chunks per token per thread

static_assert(D % 64 == 0 && D <= 256, "decode_attention: head_dim must be 64, 128, 192 or 256");
static_assert(!FG_WARP_PLAN || D <= 128, "decode_attention: the warp plan is compiled for head_dim 64 and 128");
static_assert(DH % 64 == 0 && DEC_WARPS % DEC_SPLIT_D == 0 && (DEC_SPLIT_D == 1 || DEC_WALKERS <= 2), "decode_attention: dims per warp");

// A barrier of the DEC_SPLIT_D warps sharing a step: named barrier 1 + walker (0 is __syncthreads'), its id an
// immediate so that ptxas reserves 3 barriers, not all 16.
FG_INLINE void pair_sync(int walker) {
    if (walker == 0)
        asm volatile("bar.sync 1, %0;\n" ::"n"(32 * DEC_SPLIT_D) : "memory");
    else
        asm volatile("bar.sync 2, %0;\n" ::"n"(32 * DEC_SPLIT_D) : "memory");
}

// The first token a sequence of ctx tokens attends to under a sliding window (window 0: none), and its
// number of 16-token steps, counted from the step holding that token.
FG_INLINE int win_lo(int ctx, int window) { return window > 0 && ctx > window ? ctx - window : 0; }
FG_INLINE int seq_steps(int ctx, int window) { return ceil_div(ctx, DEC_STEP) - win_lo(ctx, window) / DEC_STEP; }

FG_INLINE u32 word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Where query head h of launch row b lives: (row of q / out, head in that row, heads per row). Identity unless
// q_rows is set (a shared-prefix launch, see the top of the file); row -1 is padding.
struct QRow {
    int row, head, hq;
};

FG_INLINE QRow q_row(const int* __restrict__ q_rows, int q_group, int b, int h, int hq, int hkv) {
    if (q_rows == nullptr) return {b, h, hq};
    const int grp = hq / hkv, r = grp / q_group, w = h % grp;
    return {q_rows[(i64)b * q_group + w / r], (h / grp) * r + w % r, hkv * r};
}

// The output's destinations and the state merged into it (see the top of the file).
struct OutArgs {
    scalar_t* out;           // (rows, hq, D), or null when out_f32 is set
    float* out_f32;          // (rows, hq, D) float32 (a shared-prefix launch), or null
    float* lse;              // (rows, hq) natural log, or null
#if FG_MERGE_N
    const float* merge_o;    // (merge_n, rows, hq, D) float32 states merged into the output, or null
    const float* merge_lse;  // (merge_n, rows, hq) their natural-log LSEs (-inf: nothing to merge), or null
    int merge_n;             // states (the shared launch's key splits)
    i64 merge_stride;        // rows * hq: entries between two states
#else
    const float* merge_o;    // (rows, hq, D) float32 state merged into the output, or null
    const float* merge_lse;  // (rows, hq) its natural-log LSE (-inf: nothing to merge), or null
#endif
};

// Write one output chunk (8 dims at d0 of entry idx = row * hq + head) with its natural-log LSE, merged with the
// state of an earlier launch where there is one (merge LSE > -inf).
FG_INLINE void store_out(const OutArgs& oa, i64 idx, int d0, float* acc, float lse) {
#if FG_MERGE_N
    // The states' LSEs are loaded together first (FG_MERGE_MAX at most, the wrapper's SHARED_MAX_SPLITS), so that the
    // empty ones (LSE -inf: key splits a short shared prefix leaves unused) cost no wait of their own; then the
    // others are merged one after the other in split order.
    float l2s[FG_MERGE_MAX];
#pragma unroll
    for (int sp = 0; sp < FG_MERGE_MAX; ++sp)
        l2s[sp] = oa.merge_lse != nullptr && sp < oa.merge_n ? oa.merge_lse[idx + sp * oa.merge_stride] : FG_NEG_INF;
#pragma unroll
    for (int sp = 0; sp < FG_MERGE_MAX; ++sp) {
        const i64 e = idx + sp * oa.merge_stride;
        const float l2 = l2s[sp];
#else
    if (oa.merge_lse != nullptr) {
        const i64 e = idx;
        const float l2 = oa.merge_lse[e];
#endif
        merge_state8(acc, lse, oa.merge_o + e * D + d0, l2);
    }
    if (oa.out_f32 != nullptr) {
        float* dst = oa.out_f32 + idx * D + d0;
        *reinterpret_cast<float4*>(dst) = make_float4(acc[0], acc[1], acc[2], acc[3]);
        *reinterpret_cast<float4*>(dst + 4) = make_float4(acc[4], acc[5], acc[6], acc[7]);
    } else {
        st_v4(oa.out + idx * D + d0, pack8(acc));
    }
    if (oa.lse != nullptr && d0 == 0) oa.lse[idx] = lse;
}

struct KVStep {
    kvw_t k[2][KCH];  // tokens g, g + 8: dims 32 j + 8 c .. + 7 (of the warp's DH dims)
    kvw_t v[4][VCH];  // tokens 2c, 2c + 1, 2c + 8, 2c + 9: dims 64 j + 8 g .. + 7 (of the warp's DH dims)
#if FG_KV_INT8K
    float ks[2], vs[2];  // tokens g, g + 8: their K and V scales (the int8k cache)
#endif
};

// k_sc / v_sc: the int8k cache's scales of the kv head (scales + kvh, stride hkv per slot); unused otherwise.
FG_INLINE void load_step(KVStep& r, const kv_t* __restrict__ k_cache, const kv_t* __restrict__ v_cache,
                         i64 page_row0, int t0, int last, int bs_mask, i64 row_stride, i64 head_off, int g,
                         int c, const float* __restrict__ k_sc, const float* __restrict__ v_sc, int hkv) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int tok = min(t0 + g + 8 * i, last);
        const kv_t* p = k_cache + (page_row0 + (tok & bs_mask)) * row_stride + head_off + 8 * c;
#pragma unroll
        for (int j = 0; j < KCH; ++j) r.k[i][j] = ld_kv(p + 32 * j);
#if FG_KV_INT8K
        const i64 si = (page_row0 + (tok & bs_mask)) * hkv;
        r.ks[i] = __ldg(k_sc + si);
        r.vs[i] = __ldg(v_sc + si);
#else
        (void)k_sc, (void)v_sc, (void)hkv;
#endif
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int tok = min(t0 + 2 * c + (i & 1) + 8 * (i >> 1), last);
        const kv_t* p = v_cache + (page_row0 + (tok & bs_mask)) * row_stride + head_off + 8 * g;
#pragma unroll
        for (int j = 0; j < VCH; ++j) r.v[i][j] = ld_kv(p + 64 * j);
    }
}

// A walker's attention state over its tokens: O^T's m-tiles (tile 4 j + i: dims dbase + 64 j + 8 g + 2 i and + 1
// of heads 2 c, 2 c + 1, see the P.V product below), and the running max (log2 units) and row sum of heads 2 c
// and 2 c + 1, the sums over the warp's lanes.
struct AttnState {
    float o[DH / 16][4];
    float m0, m1, l0, l1;
};

// The warps' share of tokens [start, end) of sequence b for kv head kvh and query heads head0 .. head0 + nh - 1
// (walker w takes the 16-token steps w, w + DEC_WALKERS, ...; SOLO: this warp alone takes them all), the tokens
// below lo (a sliding window's first token; 0 without one) masked, into st. s_x: the D = 256 S^T exchange,
// (DEC_WALKERS, 2 slots, DEC_SPLIT_D, 32 lanes) float4 (unused below).
template <bool SOLO>
FG_INLINE void attend_tokens(const scalar_t* __restrict__ q, const kv_t* __restrict__ k_cache,
                             const kv_t* __restrict__ v_cache, const int* __restrict__ bt, int b, int kvh,
                             int head0, int nh, int start, int end, int lo, int hq, int hkv, int log2_bs,
                             float scale_log2, const int* __restrict__ q_rows, int q_group, float4* s_x,
                             const float* __restrict__ k_scales, const float* __restrict__ v_scales, AttnState& st) {
    static_assert(!SOLO || DEC_SPLIT_D == 1, "decode_attention: a warp alone covers all of a head's dims");
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    // D = 256: warps 2 w and 2 w + 1 share walker w's steps, on dims 0 .. 127 and 128 .. 255
    const int walker = SOLO ? 0 : warp / DEC_SPLIT_D, half = SOLO ? 0 : warp % DEC_SPLIT_D, dbase = half * DH;
    // Q^T as B fragments: head g, dims dbase + 32 j + 8 c .. + 7 (the permuted order K uses too).
    u32 qf[DH / 16][2];
    {
        const QRow qr = q_row(q_rows, q_group, b, head0 + (g < nh ? g : 0), hq, hkv);
        const bool hv = g < nh && qr.row >= 0;
        const scalar_t* qp = q + ((i64)(hv ? qr.row : 0) * qr.hq + (hv ? qr.head : 0)) * D + dbase + 8 * c;
#pragma unroll
        for (int j = 0; j < DH / 32; ++j) {
            const uint4 w = hv ? ld_v4(qp + 32 * j) : make_uint4(0u, 0u, 0u, 0u);
            qf[2 * j][0] = w.x;
            qf[2 * j][1] = w.y;
            qf[2 * j + 1][0] = w.z;
            qf[2 * j + 1][1] = w.w;
        }
    }

    float (&o)[DH / 16][4] = st.o;
#pragma unroll
    for (int i = 0; i < DH / 16; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = FG_NEG_INF, m1 = FG_NEG_INF, l0 = 0.f, l1 = 0.f;  // heads 2c and 2c + 1

    const i64 row_stride = (i64)hkv * D;
    const i64 head_off = (i64)kvh * D + dbase;
    const int bs_mask = (1 << log2_bs) - 1;
    const int last = end - 1;
    const int stride = DEC_STEP * (SOLO ? 1 : DEC_WALKERS);
#if FG_KV_INT8K
    const float* const k_sc = k_scales + kvh;  // the int8k cache's scales of this kv head
    const float* const v_sc = v_scales + kvh;
#else
    const float* const k_sc = k_scales;  // null
    const float* const v_sc = v_scales;
#endif
    int par = 0;  // D = 256: the exchange slot of this step (steps alternate)
    (void)par;
    (void)s_x;

    int t0 = start + DEC_STEP * walker;
    KVStep cur;
    if (t0 < end) load_step(cur, k_cache, v_cache, (i64)bt[t0 >> log2_bs] << log2_bs, t0, last, bs_mask,
                            row_stride, head_off, g, c, k_sc, v_sc, hkv);
    int next_page = t0 + stride < end ? bt[(t0 + stride) >> log2_bs] : 0;

    for (; t0 < end; t0 += stride) {
        const int t1 = t0 + stride;
        KVStep nxt;
        if (t1 < end)
            load_step(nxt, k_cache, v_cache, (i64)next_page << log2_bs, t1, last, bs_mask, row_stride,
                      head_off, g, c, k_sc, v_sc, hkv);
        if (t1 + stride < end) next_page = bt[(t1 + stride) >> log2_bs];

        // S^T = K . Q^T: rows = tokens g, g + 8; columns = heads 2c, 2c + 1.
        float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int j = 0; j < KCH; ++j) {
            const uint4 k0 = k_expand(cur.k[0][j]), k1 = k_expand(cur.k[1][j]);
            u32 a[4];
            a[0] = k0.x; a[1] = k1.x; a[2] = k0.y; a[3] = k1.y;
            mma_16816(s, a, qf[2 * j]);
            a[0] = k0.z; a[1] = k1.z; a[2] = k0.w; a[3] = k1.w;
            mma_16816(s, a, qf[2 * j + 1]);
        }
#if DEC_SPLIT_D > 1
        {   // add the other warp's half of S^T (same lane: same tokens and heads); own + other in both warps,
            // which is the same float sum either way round
            float4* xs = s_x + ((walker * 2 + par) * DEC_SPLIT_D) * 32 + lane;
            xs[half * 32] = make_float4(s[0], s[1], s[2], s[3]);
            pair_sync(walker);
            const float4 x = xs[(half ^ 1) * 32];
            s[0] += x.x; s[1] += x.y; s[2] += x.z; s[3] += x.w;
            par ^= 1;  // the slot is rewritten two steps later, after this step's barrier and the next one:
                       // by then the other warp has read it (it reads before reaching the next barrier)
        }
#endif
        const bool v0 = t0 + g < end && t0 + g >= lo, v1 = t0 + g + 8 < end && t0 + g + 8 >= lo;
#if FG_KV_INT8K
        const float sc0 = cur.ks[0] * scale_log2, sc1 = cur.ks[1] * scale_log2;  // tokens g, g + 8: K's scales
#else
        const float sc0 = scale_log2, sc1 = scale_log2;
#endif
        s[0] = v0 ? s[0] * sc0 : FG_NEG_INF;
        s[1] = v0 ? s[1] * sc0 : FG_NEG_INF;
        s[2] = v1 ? s[2] * sc1 : FG_NEG_INF;
        s[3] = v1 ? s[3] * sc1 : FG_NEG_INF;

        // Online softmax per head (column); tokens are spread over the lanes of equal c.
        float mx0 = fmaxf(s[0], s[2]), mx1 = fmaxf(s[1], s[3]);
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float mu0 = mn0 == FG_NEG_INF ? 0.f : mn0, mu1 = mn1 == FG_NEG_INF ? 0.f : mn1;
        const float al0 = fast_exp2(m0 - mu0), al1 = fast_exp2(m1 - mu1);
        const float p0 = fast_exp2(s[0] - mu0), p2 = fast_exp2(s[2] - mu0);
        const float p1 = fast_exp2(s[1] - mu1), p3 = fast_exp2(s[3] - mu1);
        l0 = l0 * al0 + p0 + p2;
        l1 = l1 * al1 + p1 + p3;
        m0 = mn0;
        m1 = mn1;
#pragma unroll
        for (int i = 0; i < DH / 16; ++i) {
            o[i][0] *= al0; o[i][1] *= al1; o[i][2] *= al0; o[i][3] *= al1;
        }

        // P^T as B fragments: (tokens 2c..2c+1 | 2c+8..2c+9, head g).
        u32 pb[2];
#if FG_KV_INT8K
        {   // V's scales of tokens g, g + 8 times 448 (their heads' amax; the output gets v_scale = 1 / 448)
            const float w0 = cur.vs[0] * FG_INT8K_VMAX, w1 = cur.vs[1] * FG_INT8K_VMAX;
            pb[0] = movmatrix_trans(pack2(p0 * w0, p1 * w0));
            pb[1] = movmatrix_trans(pack2(p2 * w1, p3 * w1));
        }
#else
        pb[0] = movmatrix_trans(pack2(p0, p1));
        pb[1] = movmatrix_trans(pack2(p2, p3));
#endif

        // O^T += V^T . P^T; m-tile 4 j + i covers dims dbase + 64 j + 8 g + 2 i (row g) and + 1 (row g + 8).
#pragma unroll
        for (int j = 0; j < VCH; ++j) {
            const uint4 v0 = v_expand(cur.v[0][j]), v1 = v_expand(cur.v[1][j]);
            const uint4 v2 = v_expand(cur.v[2][j]), v3 = v_expand(cur.v[3][j]);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const u32 wa = word(v0, i), wb = word(v1, i);
                const u32 wc = word(v2, i), wd = word(v3, i);
                u32 a[4];
                a[0] = pack_lo(wa, wb);
                a[1] = pack_hi(wa, wb);
                a[2] = pack_lo(wc, wd);
                a[3] = pack_hi(wc, wd);
                mma_16816(o[4 * j + i], a, pb);
            }
        }
        cur = nxt;
    }

    // Row sums over the warp's tokens.
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    st.m0 = m0;
    st.m1 = m1;
    st.l0 = l0;
    st.l1 = l1;
}

// A walker leaves its state in shared memory for finish_piece's merge of the walkers.
FG_INLINE void state_to_smem(const AttnState& st, float (*s_o)[DEC_HEADS][D], float (*s_m)[DEC_HEADS],
                             float (*s_l)[DEC_HEADS]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int walker = warp / DEC_SPLIT_D, half = warp % DEC_SPLIT_D, dbase = half * DH;
#pragma unroll
    for (int j = 0; j < VCH; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int d = dbase + 64 * j + 8 * g + 2 * i;
            s_o[walker][2 * c][d] = st.o[4 * j + i][0];
            s_o[walker][2 * c + 1][d] = st.o[4 * j + i][1];
            s_o[walker][2 * c][d + 1] = st.o[4 * j + i][2];
            s_o[walker][2 * c + 1][d + 1] = st.o[4 * j + i][3];
        }
    }
    if (g == 0 && half == 0) {  // D = 256: both warps of a walker hold the same (m, l)
        s_m[walker][2 * c] = st.m0;
        s_m[walker][2 * c + 1] = st.m1;
        s_l[walker][2 * c] = st.l0;
        s_l[walker][2 * c + 1] = st.l1;
    }
}

// The warp plan's output: one warp covered the whole pair, so its state is the pair's. Lane (g, c) holds dims
// 64 j + 8 g .. + 7 of heads 2 c and 2 c + 1 (tiles 4 j + i, entries 0 / 2 and 1 / 3) and writes them as they
// are, normalized as finish_piece normalizes a whole pair.
FG_INLINE void solo_store(const OutArgs& oa, const AttnState& st, int b, int hq, int head0, int nh, float v_scale,
                          int hkv, const int* __restrict__ q_rows, int q_group) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
        const int h = 2 * c + k;
        if (h >= nh) continue;
        const QRow qr = q_row(q_rows, q_group, b, head0 + h, hq, hkv);
        if (qr.row < 0) continue;
        const float m = k ? st.m1 : st.m0, l = k ? st.l1 : st.l0;
        const float inv = v_scale / l, lse = (m + __log2f(l)) * FG_LN2;
#pragma unroll
        for (int j = 0; j < VCH; ++j) {
            float acc[8];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                acc[2 * i] = st.o[4 * j + i][k] * inv;
                acc[2 * i + 1] = st.o[4 * j + i][k + 2] * inv;
            }
            store_out(oa, (i64)qr.row * qr.hq + qr.head, 64 * j + 8 * g, acc, lse);
        }
    }
}

// A sequence with no cached token: zeros and LSE -inf for its hq heads (or the merged state as it is), written
// by threads t0, t0 + step, ... A shared-prefix launch (q_rows) writes nothing: its LSE stays -inf.
FG_INLINE void write_empty(const OutArgs& oa, const int* __restrict__ q_rows, int b, int hq, int t0, int step) {
    if (q_rows != nullptr) return;
    for (int i = t0; i < hq * (D / 8); i += step) {
        float acc[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) acc[x] = 0.f;
        store_out(oa, (i64)b * hq + i / (D / 8), 8 * (i % (D / 8)), acc, FG_NEG_INF);
    }
}

// After attend_tokens: merge the walkers' (O, m, l) for heads head0 .. head0 + nh - 1 of sequence b. A whole
// pair is written to out (and the LSE); a piece writes a float32 partial O and its LSE (log2) to `slot`,
// counts itself done on the pair's counter, and the last of the pair's pieces to finish (slices c0 .. c1;
// slice c's partial is in slot 2 c, or 2 c + 1 for a balanced slice that starts before the pair,
// pstart > c S) merges them in slice order: out = sum_c w_c O_c / sum_c w_c, w_c = 2^(lse_c - max lse).
FG_INLINE void finish_piece(const OutArgs& oa, float* __restrict__ part_o,
                            float* __restrict__ part_lse, int* counter, int b, int hq, int head0, int nh, bool whole,
                            int slot, int c0, int c1, bool balanced, int S, int pstart,
                            const float (*s_o)[DEC_HEADS][D], const float (*s_m)[DEC_HEADS],
                            const float (*s_l)[DEC_HEADS], float v_scale, int hkv, const int* __restrict__ q_rows,
                            int q_group) {
    const int tid = threadIdx.x;
    for (int i = tid; i < nh * (D / 8); i += blockDim.x) {
        const int h = i / (D / 8), d0 = (i % (D / 8)) * 8;
        float mm = FG_NEG_INF;
#pragma unroll
        for (int w = 0; w < DEC_WALKERS; ++w) mm = fmaxf(mm, s_m[w][h]);
        float ll = 0.f, acc[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) acc[x] = 0.f;
#pragma unroll
        for (int w = 0; w < DEC_WALKERS; ++w) {
            const float sc = fast_exp2(s_m[w][h] - mm);  // 0 for a warp that saw no token
            ll += s_l[w][h] * sc;
#pragma unroll
            for (int x = 0; x < 8; ++x) acc[x] += s_o[w][h][d0 + x] * sc;
        }
        const float inv = v_scale / ll;  // v_scale: the FP8 cache's V scale (1 otherwise); partials carry it too
#pragma unroll
        for (int x = 0; x < 8; ++x) acc[x] *= inv;
        if (whole) {
            const QRow qr = q_row(q_rows, q_group, b, head0 + h, hq, hkv);
            if (qr.row >= 0)
                store_out(oa, (i64)qr.row * qr.hq + qr.head, d0, acc, (mm + __log2f(ll)) * FG_LN2);
        } else {
            float* dst = part_o + ((i64)slot * DEC_HEADS + h) * D + d0;
            *reinterpret_cast<float4*>(dst) = make_float4(acc[0], acc[1], acc[2], acc[3]);
            *reinterpret_cast<float4*>(dst + 4) = make_float4(acc[4], acc[5], acc[6], acc[7]);
            if (d0 == 0) part_lse[(i64)slot * DEC_HEADS + h] = mm + __log2f(ll);
        }
    }
    if (whole || !arrive_last(counter, c1 - c0 + 1)) return;
    for (int i = tid; i < nh * (D / 8); i += blockDim.x) {
        const int h = i / (D / 8), d0 = (i % (D / 8)) * 8;
        float mm = FG_NEG_INF;
        for (int c = c0; c <= c1; ++c) {
            const int cs = 2 * c + (balanced && pstart > c * S ? 1 : 0);
            mm = fmaxf(mm, __ldcg(part_lse + (i64)cs * DEC_HEADS + h));
        }
        float ll = 0.f, acc[8];
#pragma unroll
        for (int x = 0; x < 8; ++x) acc[x] = 0.f;
        for (int c = c0; c <= c1; ++c) {
            const i64 idx = (i64)(2 * c + (balanced && pstart > c * S ? 1 : 0)) * DEC_HEADS + h;
            const float w = fast_exp2(__ldcg(part_lse + idx) - mm);
            const float4 v0 = __ldcg(reinterpret_cast<const float4*>(part_o + idx * D + d0));
            const float4 v1 = __ldcg(reinterpret_cast<const float4*>(part_o + idx * D + d0 + 4));
            ll += w;
            acc[0] += w * v0.x; acc[1] += w * v0.y; acc[2] += w * v0.z; acc[3] += w * v0.w;
            acc[4] += w * v1.x; acc[5] += w * v1.y; acc[6] += w * v1.z; acc[7] += w * v1.w;
        }
        const float inv = 1.f / ll;
#pragma unroll
        for (int x = 0; x < 8; ++x) acc[x] *= inv;
        const QRow qr = q_row(q_rows, q_group, b, head0 + h, hq, hkv);
        if (qr.row >= 0)
            store_out(oa, (i64)qr.row * qr.hq + qr.head, d0, acc, (mm + __log2f(ll)) * FG_LN2);
    }
}

extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32, 2)
decode_attention_kernel(const scalar_t* __restrict__ q,        // (B, Hq, D)
                        const kv_t* __restrict__ k_cache,      // (num_blocks, block_size, Hkv, D)
                        const kv_t* __restrict__ v_cache,
                        const int* __restrict__ context_lens,  // (B,)
                        const int* __restrict__ block_tables,  // (B, bt_stride)
                        int bt_stride,
                        scalar_t* __restrict__ out,            // (B, Hq, D)
                        float* __restrict__ lse_out,           // (B, Hq) natural log, or null
                        float* __restrict__ part_o,            // (2 * gridDim.x, DEC_HEADS, D); null
                                                               //   when every CTA covers a whole pair
                        float* __restrict__ part_lse,          // (2 * gridDim.x, DEC_HEADS), log2 units
                        int* __restrict__ pair_counters,       // (B * Hkv * ceil(G / 8),) zeros
                        int batch, int hq, int hkv, int log2_bs, float scale_log2,
                        int num_splits,                        // grid (num_splits, Hkv * ceil(G / 8), B)
                        int plan,                              // 0 auto, 1 split, 2 balanced, 3 warp
                        int slots,                             // CTAs resident at once (auto's estimate)
                        float v_scale,                         // multiplies the output (FP8 cache, int8k:
                                                               //   1 / 448; else 1)
                        const int* __restrict__ q_rows,        // shared-prefix launch: (batch, q_group), or null
                        int q_group,                           //   (1 when q_rows is null)
                        const int* __restrict__ bt_offset,     // (batch,) blocks each sequence skips, or null
                        float* __restrict__ out_f32,           // float32 output instead of out, or null
                        const float* __restrict__ merge_o,     // (batch, hq, D) float32 state merged into the
                        const float* __restrict__ merge_lse,   //   output, (batch, hq) natural log; or both null
#if FG_MERGE_N
                        int merge_n,                           //   (merge_n of each: FG_MERGE_N)
#endif
                        int window                             // sliding window (0: none; not with q_rows)
#if FG_KV_INT8K
                        , const float* __restrict__ k_scales,  // int8k cache: (num_blocks * block_size, Hkv)
                        const float* __restrict__ v_scales     //   float32, the scales of K and V per slot and head
#endif
                        ) {
    pdl_prologue();  // before any memory access (common.cuh)
#if !FG_KV_INT8K
    const float* const k_scales = nullptr;
    const float* const v_scales = nullptr;
#endif
    __shared__ __align__(16) float s_o[DEC_WALKERS][DEC_HEADS][D];
    __shared__ float s_m[DEC_WALKERS][DEC_HEADS];
    __shared__ float s_l[DEC_WALKERS][DEC_HEADS];
#if DEC_SPLIT_D > 1
    __shared__ float4 s_x[DEC_WALKERS * 2 * DEC_SPLIT_D * 32];  // the S^T exchange (see attend_tokens)
#else
    float4* const s_x = nullptr;
#endif

    const int group = hq / hkv;
    const int hgroups = ceil_div(group, DEC_HEADS);
    const int per_b = hkv * hgroups;  // pairs per sequence (= gridDim.y)
    // Grid (num_splits, pairs per sequence, B): the split plan reads its piece, pair and sequence straight from
    // blockIdx (no divisions before its first load); the balanced plan numbers the CTAs in that order.
    const int ncta = gridDim.x * gridDim.y * gridDim.z;
    const int cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
#if FG_MERGE_N
    const OutArgs oa{out, out_f32, lse_out, merge_o, merge_lse, merge_n, (i64)batch * hq};
#else
    const OutArgs oa{out, out_f32, lse_out, merge_o, merge_lse};
#endif

#if FG_WARP_PLAN
    // Warp plan (plan 3; the wrapper's grid (ceil(pairs / DEC_WARPS), 1, 1)): warp w of CTA i takes pair
    // DEC_WARPS i + w whole and writes its output itself: no walkers to merge, no block barrier, no partials.
    // Pairs run b-major, so a CTA's warps are the kv heads of one sequence (or two), of equal lengths. The variant
    // is launched for plan 3 only, so the other plans below are dead code in it and compiled out.
    {
        const int p = blockIdx.x * DEC_WARPS + warp;
        if (p >= batch * per_b) return;
        const int b = p / per_b, j = p % per_b, ctx = context_lens[b];
        if (ctx == 0) {  // zeros and LSE -inf for all of b's heads, from the warp of its first pair
            if (j == 0) write_empty(oa, q_rows, b, hq, lane, 32);
            return;
        }
        const int kvh = j / hgroups, hg = j % hgroups;
        const int head0 = kvh * group + hg * DEC_HEADS, nh = min(DEC_HEADS, group - hg * DEC_HEADS);
        const int* bt = block_tables + (i64)b * bt_stride + (bt_offset != nullptr ? bt_offset[b] : 0);
        const int lo = win_lo(ctx, window);
        AttnState st;
        attend_tokens<true>(q, k_cache, v_cache, bt, b, kvh, head0, nh, lo / DEC_STEP * DEC_STEP, ctx, lo, hq, hkv,
                            log2_bs, scale_log2, q_rows, q_group, s_x, k_scales, v_scales, st);
        solo_store(oa, st, b, hq, head0, nh, v_scale, hkv, q_rows, q_group);
        return;
    }
#endif

    // Split plan (plan 1, or plan 0 by the rule below): CTA i takes piece i % num_splits of pair
    // i / num_splits, every pair cut in num_splits pieces of equal whole steps (multiples of 4); it needs no
    // view of the batch. Balanced plan (plan 2, or plan 0 otherwise): the steps of all pairs laid end to end,
    // b-major, cut into gridDim.x equal slices, slice i on CTA i. The batch is scanned by every warp on its
    // own (no block barrier), 128 sequences at a time: steps per head group, their sum, the non-empty
    // sequences, the most steps of one, and whether the lengths never increase.
    constexpr unsigned FULL = 0xffffffffu;
    const int sctx = plan != 2 ? context_lens[blockIdx.z] : 0;  // the split plan's; loaded first, it overlaps the scan
    int total = 0, count = 0, hi = 0, n0 = 0;
    bool balanced = plan == 2, longest_first = true;
    if (plan != 1) {
        for (int b0 = 0; b0 < batch; b0 += 128) {
            int n[4], nx[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int b = b0 + 32 * u + lane;
                n[u] = b < batch ? context_lens[b] : 0;
                nx[u] = b + 1 < batch ? context_lens[b + 1] : 0;
            }
            if (b0 == 0) n0 = n[0];
            int st_sum = 0, nonempty = 0, st_max = 0;  // this lane's 4 sequences first, then the warp
            bool ordered = true;
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int st = seq_steps(n[u], window);
                st_sum += st;
                nonempty += n[u] > 0;
                st_max = max(st_max, st);
                ordered = ordered && n[u] >= nx[u];
            }
            total += __reduce_add_sync(FULL, st_sum);
            count += __reduce_add_sync(FULL, nonempty);
            hi = max(hi, __reduce_max_sync(FULL, st_max));
            longest_first = __all_sync(FULL, longest_first && ordered);
        }
        // Auto: the split plan when the lengths are within 5% of equal, or when the grid is over one wave,
        // the batch comes longest first (the engine orders it so) and its longest piece is at most 1.25x one
        // slot's share of the work: CTAs are dispatched in batch order, so the long pieces start first and
        // the short ones fill in behind them, and a CTA left alone on its SM at the end runs faster. There
        // the split plan measured ahead of the balanced one (no slice crosses a pair). Otherwise balanced.
        if (plan == 0) {
            const int piece = ceil_div(ceil_div(hi, num_splits), DEC_WARPS) * DEC_WARPS;
            const bool near_equal = (i64)total * 20 >= (i64)count * hi * 19;
            const bool dispatch_evens_out = longest_first && ncta > slots &&
                                            (i64)piece * slots * 100 <= (i64)total * per_b * 125;
            balanced = !near_equal && !dispatch_evens_out;
        }
    }
    if (!balanced) {
        const int b = blockIdx.z, j = blockIdx.y, p = b * per_b + j, ctx = sctx, nst = seq_steps(ctx, window);
        const int chunk = ceil_div(ceil_div(nst, num_splits), DEC_WARPS) * DEC_WARPS;
        const int a = blockIdx.x * chunk;
        if (a >= nst) {  // an empty piece; an empty context gets zeros from its first piece
            if (ctx == 0 && a == 0 && j == 0)
                write_empty(oa, q_rows, b, hq, tid, blockDim.x);
            return;
        }
        const int e = min(a + chunk, nst);
        const int kvh = j / hgroups, hg = j % hgroups;
        const int head0 = kvh * group + hg * DEC_HEADS, nh = min(DEC_HEADS, group - hg * DEC_HEADS);
        const int* bt = block_tables + (i64)b * bt_stride + (bt_offset != nullptr ? bt_offset[b] : 0);
        const int lo = win_lo(ctx, window), fs = lo / DEC_STEP;  // the first token and step (window; else 0)
        {
            AttnState st;
            attend_tokens<false>(q, k_cache, v_cache, bt, b, kvh, head0, nh, (fs + a) * DEC_STEP,
                                 min((fs + e) * DEC_STEP, ctx), lo, hq, hkv, log2_bs, scale_log2, q_rows, q_group, s_x,
                                 k_scales, v_scales, st);
            state_to_smem(st, s_o, s_m, s_l);
        }
        __syncthreads();
        finish_piece(oa, part_o, part_lse, pair_counters + p, b, hq, head0, nh, a == 0 && e == nst,
                     2 * cta, p * num_splits, p * num_splits + ceil_div(nst, chunk) - 1, false, 0, 0, s_o, s_m, s_l,
                     v_scale, hkv, q_rows, q_group);
        return;
    }
    total *= per_b;  // steps of all pairs (the wrapper keeps it below 2^30)
    const int S = max(ceil_div(total, ncta), DEC_MIN_SLICE);
    const int start = min(cta * S, total);
    const int end = min(start + S, total);

    // The sequence b the slice starts in, the step its first pair starts at (base), its context length.
    int b = 0, base = 0, ctx = 0;
    for (int b0 = 0, cum = 0; start < end && b0 < batch; b0 += 32) {
        const int n = b0 == 0 ? n0 : (b0 + lane < batch ? context_lens[b0 + lane] : 0);
        const int st = seq_steps(n, window);
        int incl = st;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int v = __shfl_up_sync(FULL, incl, off);
            if (lane >= off) incl += v;
        }
        const unsigned hit = __ballot_sync(FULL, st > 0 && start < (cum + incl) * per_b);
        if (hit) {
            const int l = __ffs(hit) - 1;
            b = b0 + l;
            base = (cum + __shfl_sync(FULL, incl - st, l)) * per_b;
            ctx = __shfl_sync(FULL, n, l);
            break;
        }
        cum += __shfl_sync(FULL, incl, 31);
    }

    int pos = start;
    while (pos < end) {
        const int nst = seq_steps(ctx, window);
        if (pos >= base + nst * per_b) {  // past sequence b (or b is empty)
            base += nst * per_b;
            ctx = context_lens[++b];
            continue;
        }
        const int j = (pos - base) / nst;
        const int kvh = j / hgroups, hg = j % hgroups;
        const int head0 = kvh * group + hg * DEC_HEADS;
        const int nh = min(DEC_HEADS, group - hg * DEC_HEADS);
        const int pstart = base + j * nst, pend = pstart + nst;
        const int a = pos - pstart, e = min(end, pend) - pstart;  // steps [a, e) of the pair
        pos = pstart + e;

        const int* bt = block_tables + (i64)b * bt_stride + (bt_offset != nullptr ? bt_offset[b] : 0);
        const int lo = win_lo(ctx, window), fs = lo / DEC_STEP;  // the first token and step (window; else 0)
        {
            AttnState st;
            attend_tokens<false>(q, k_cache, v_cache, bt, b, kvh, head0, nh, (fs + a) * DEC_STEP,
                                 min((fs + e) * DEC_STEP, ctx), lo, hq, hkv, log2_bs, scale_log2, q_rows, q_group, s_x,
                                 k_scales, v_scales, st);
            state_to_smem(st, s_o, s_m, s_l);
        }
        __syncthreads();

        finish_piece(oa, part_o, part_lse, pair_counters + (i64)b * per_b + j, b, hq, head0, nh,
                     a == 0 && e == nst, 2 * cta + (pstart > start ? 1 : 0), pstart / S, (pend - 1) / S, true, S,
                     pstart, s_o, s_m, s_l, v_scale, hkv, q_rows, q_group);
        __syncthreads();
    }
    for (int e = cta; e < batch; e += ncta)  // empty contexts: zeros, from CTA b % gridDim.x
        if (context_lens[e] == 0) write_empty(oa, q_rows, e, hq, tid, blockDim.x);
}
