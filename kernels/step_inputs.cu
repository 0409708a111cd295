// step_inputs.cu: a packed decode step (engine/step_packing.py's int32 layout, copied to a fixed device buffer)
// into a decode graph's static inputs, as the first node of the graph (engine/cuda_graphs.py).
//
// Before it the engine's thread filled those buffers with ~17 slice copies a step, and gathered the input ids
// from the token slots with one more op: each a launch, and a point where the thread let go of the GIL. The
// step's sizes (rows B, table width W, groups NG) are read here from the step's header on the device, so the one
// graph of a batch bucket serves every step that fits it.
//
// decode_graph_inputs_kernel: grid (bs + ngb), 128 threads. CTA r < bs is row r of the batch bucket: rows
// below B take the step's id (through slot_tokens when given: the pipelined decode's token slots), position,
// cache slot, context length and block-table row (and, with groups, skip and suffix length); the padding rows
// write no KV (slot -1) and attend to one token (context 1, block 0), as the graphs were captured with. CTA
// bs + g is shared-prefix group g of the group bucket: below NG the step's members, shared length and shared
// blocks; past it no members (-1) and no shared tokens. ngb = 0: a graph without groups.
#include "common.cuh"

#define STEP_HEADER 9

extern "C" __global__ void __launch_bounds__(128)
decode_graph_inputs_kernel(const int* __restrict__ step, int bs, int ngb, const i64* __restrict__ slot_tokens,
                           i64* __restrict__ input_ids, int* __restrict__ positions, int* __restrict__ slot_mapping,
                           int* __restrict__ context_lens, int* __restrict__ block_tables, int table_stride,
                           int* __restrict__ q_rows, int group, int* __restrict__ shared_lens,
                           int* __restrict__ shared_tables, int* __restrict__ skip, int* __restrict__ suffix_lens) {
    // header: is_prefill, T, B, W, max_q, n_rows, NG, G, longest (a decode step: T == B)
    const int T = step[1], B = step[2], W = step[3], n_rows = step[5], NG = step[6], G = step[7];
    const int* ids = step + STEP_HEADER;
    const int* pos = ids + T;
    const int* slots = pos + T;
    const int* ctx = slots + T;
    const int* table = ctx + 2 * B + 1;  // past the context lengths and cu_seqlens
    const int* g_rows = table + (i64)B * W + n_rows;
    const int* g_lens = g_rows + (i64)NG * G;
    const int* g_table = g_lens + NG;
    const int* g_skip = g_table + (i64)NG * W;
    const int* g_suffix = g_skip + B;
    const int c = blockIdx.x;
    if (c < bs) {
        const int r = c;
        int* row = block_tables + (i64)r * table_stride;
        if (r < B) {
            if (threadIdx.x == 0) {
                input_ids[r] = slot_tokens != nullptr ? slot_tokens[ids[r]] : (i64)ids[r];
                positions[r] = pos[r];
                slot_mapping[r] = slots[r];
                context_lens[r] = ctx[r];
                if (ngb > 0) {
                    skip[r] = g_skip[r];
                    suffix_lens[r] = g_suffix[r];
                }
            }
            for (int j = threadIdx.x; j < W; j += blockDim.x) row[j] = table[(i64)r * W + j];
        } else if (threadIdx.x == 0) {
            input_ids[r] = 0;
            positions[r] = 0;
            slot_mapping[r] = -1;
            context_lens[r] = 1;
            row[0] = 0;
            if (ngb > 0) {
                skip[r] = 0;
                suffix_lens[r] = 1;
            }
        }
        return;
    }
    const int g = c - bs;
    if (g >= ngb) return;
    if (g < NG) {
        for (int j = threadIdx.x; j < group; j += blockDim.x) {
            q_rows[(i64)g * group + j] = j < G ? g_rows[(i64)g * G + j] : -1;
        }
        if (threadIdx.x == 0) shared_lens[g] = g_lens[g];
        int* row = shared_tables + (i64)g * table_stride;
        for (int j = threadIdx.x; j < W; j += blockDim.x) row[j] = g_table[(i64)g * W + j];
    } else {
        for (int j = threadIdx.x; j < group; j += blockDim.x) q_rows[(i64)g * group + j] = -1;
        if (threadIdx.x == 0) shared_lens[g] = 0;
    }
}
