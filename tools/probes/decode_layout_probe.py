"""Does the paged cache's interleaving of kv heads cost decode bandwidth? Same K/V bytes read three ways:
(a) the engine's layout (block, token, kv_head, dim), 8 kv heads, random block order; (b) the same with blocks
in order; (c) one kv head per "sequence" (B x 8 sequences of group 4): each CTA reads contiguous runs of a
page. Prints TB/s (K+V bytes / time, CUDA-graph replays) next to SDPA CUDNN on contiguous tensors.
  PYTHONPATH=. python3 tools/probes/decode_layout_probe.py"""
import torch

# decode_read_probe sits beside this file (sys.path[0] when run as a script); its CUDNN peer makes the same
# draws (K, V, then q) and timing as the inline peer it replaced
from decode_read_probe import cudnn
from flashgen.ops import cuda_ops as ops
from flashgen.ops.timing import bench, fixed

dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)
hq, hkv, d = 32, 8, 128
for B, L in [(64, 4096), (16, 16384)]:
    kv = 2 * B * L * hkv * d * 2
    row = {}
    for bs in (16, 64):
        nb = B * L // bs
        q = torch.randn(B, hq, d, generator=g, device=dev).to(torch.bfloat16)
        kc = torch.randn(nb, bs, hkv, d, generator=g, device=dev).to(torch.bfloat16)
        vc = torch.randn(nb, bs, hkv, d, generator=g, device=dev).to(torch.bfloat16)
        ctx = torch.full((B,), L, dtype=torch.int32, device=dev)
        for name, bt in (("perm", torch.randperm(nb, generator=g, device=dev)), ("seq", torch.arange(nb, device=dev))):
            bt = bt.to(torch.int32).view(B, L // bs)
            row[f"interleaved bs{bs} {name}"] = kv / bench(fixed(ops.decode_attention, q, kc, vc, ctx, bt, d**-0.5))
        del kc, vc
        # (c) head-major: B*8 sequences with one kv head each
        q1 = q.view(B * hkv, hq // hkv, d)
        kc1 = torch.randn(nb * hkv, bs, 1, d, generator=g, device=dev).to(torch.bfloat16)
        vc1 = torch.randn(nb * hkv, bs, 1, d, generator=g, device=dev).to(torch.bfloat16)
        ctx1 = torch.full((B * hkv,), L, dtype=torch.int32, device=dev)
        bt1 = torch.randperm(nb * hkv, generator=g, device=dev).to(torch.int32).view(B * hkv, L // bs)
        row[f"head-major bs{bs} perm"] = kv / bench(fixed(ops.decode_attention, q1, kc1, vc1, ctx1, bt1, d**-0.5))
        del kc1, vc1
    row["SDPA CUDNN contiguous"] = cudnn(B, L, g, dev) * 1e12
    print(f"B{B} L{L}: " + ", ".join(f"{k} {v / 1e12:.3f}" for k, v in row.items()), flush=True)
