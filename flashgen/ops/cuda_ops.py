"""CUDA backend: thin wrappers over kernels/*.cu (compiled at run time by CuPy, see jit.py).

Same functions, signatures and return conventions as torch_ops (the reference; the contract both follow is
flashgen.ops.backend.OpsBackend); each may also take `out=` (and decode_attention `return_lse=`,
`num_splits=`). Every wrapper checks device, dtype, shape and contiguity, and refuses anything else with a
ValueError that names the argument and its value. Launches go to torch's current stream with raw pointers, so
the ops can be captured in CUDA graphs (compile first: the first call of each variant compiles and loads its
module).

This module is the backend's public face (`get_ops("cuda")`); the code lives in one module per job:
  cuda_checks.py      argument checks and device queries shared by every wrapper
  cuda_linear.py      linear: cuBLAS or the skinny GEMM, the per-shape plan chosen by timing; linear_fp8:
                      FP8 weights through cuBLASLt's FP8 GEMM (torch._scaled_mm) or, up to 8 rows, the FP8
                      skinny GEMM (the same kind of plan); linear_fp8_rows: the same on rows already quantized
  cuda_elementwise.py rms_norm, silu_mul, gelu_tanh_mul, rope_kv_append; rms_norm_fp8 and act_mul_fp8 (their
                      output quantized in the same kernel for an FP8-weight layer next)
  cuda_attention.py   prefill_attention and decode_attention, their plans and merge counters
  cuda_sampling.py    gumbel_argmax
  cuda_moe.py         moe: the experts as two grouped GEMMs (torch._grouped_mm, no host sync, capturable) in
                      bfloat16 on SM90 / SM100; elsewhere, or with FLASHGEN_MOE=loop, the reference's
                      per-expert loop over cuBLAS GEMMs (torch_moe.py)

Importing this module needs neither CuPy nor a GPU; calling an op does.

Shapes (docs/design.md):
  k_cache, v_cache : (num_blocks, block_size, num_kv_heads, head_dim), block_size a power of two >= 16
  block_tables     : (batch, max_blocks_per_seq) int32, last dim contiguous
  slot_mapping     : (num_tokens,) int32 or int64, block * block_size + offset; -1 = do not write
  cos_sin          : (max_positions, head_dim) float32: cos in [:, :head_dim/2], sin in [:, head_dim/2:]
"""
from __future__ import annotations

# The backend's public names: the ops, and the constants callers choose or parametrize with. Private state
# and helpers live in (and are reached through) their own modules.
from flashgen.ops.cuda_attention import (  # noqa: F401
    ATTN_HEAD_DIMS,
    DECODE_MAX_SPLITS,
    DECODE_PLANS,
    PREFILL_IMPLS,
    PREFILL_SM90_HEAD_DIMS,
    PREFILL_SM90_SMEM,
    PREFILL_TILE_CHOICES,
    PREFILL_TILE_CHOICES_BY_DIM,
    PREFILL_TILES,
    SHARED_KERNELS,
    SHARED_TILES,
    WARP_AUTO_MAX_CONTEXT,
    WGMMA_ARCH,
    decode_attention,
    decode_num_splits,
    decode_plan,
    prefill_attention,
    prefill_impl,
    prefill_smem_bytes,
    warp_min_batch,
)
from flashgen.ops.cuda_checks import KERNEL_DTYPES  # noqa: F401
from flashgen.ops.cuda_elementwise import (  # noqa: F401
    RMS_MAX_HIDDEN,
    act_mul_fp8,
    gelu_tanh_mul,
    rms_norm,
    rms_norm_fp8,
    rope_kv_append,
    silu_mul,
)
from flashgen.ops.cuda_linear import (  # noqa: F401
    FP8_GEMM_MULTIPLE,
    LINEAR_TIMES,
    SKINNY_FP8_VARIANTS,
    SKINNY_MAX_ROWS,
    SKINNY_VARIANTS,
    linear,
    linear_fp8,
    linear_fp8_plan,
    linear_fp8_rows,
    linear_plan,
    skinny_gemm,
    skinny_gemm_fp8,
)
from flashgen.ops.cuda_moe import MOE_IMPLS, moe, moe_grouped, moe_impl, moe_loop  # noqa: F401
from flashgen.ops.cuda_sampling import gumbel_argmax  # noqa: F401
