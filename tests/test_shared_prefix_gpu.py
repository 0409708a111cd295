"""Shared-prefix (cascade) decode on the GPU: the groups' shared blocks (prefill_attention.cu's PF_SHARED kernel,
or kernels/decode_attention.cu with the members as query heads), then each sequence's own blocks merged into the
output by the decode kernel, against a float32 oracle of the same attention without groups, err(grouped) <= 2 *
err(the kernel without groups) + eps, over GQA ratios, head dims, block sizes, split counts and plans, the FP8
cache; then the engine's captured graphs with groups against the same run without them."""
from __future__ import annotations

import random

import pytest
import torch

from flashgen.engine.step_packing import SHARED_GROUP, SHARED_GROUP_WIDE
from flashgen.ops import cuda_attention, cuda_ops, torch_ops
from test_kernels_gpu import DEV, DTYPES, _seed
from test_shared_prefix import shared_batch

pytestmark = pytest.mark.gpu

CASES = [  # (groups: (shared blocks, tokens past them per member), sequences in no group)
    ([(2, [1, 5, 17, 16])], [40]),
    ([(1, [1, 1]), (4, [30] * (SHARED_GROUP + 3))], []),  # two chunks
    ([(3, [64, 1, 65])], [1, 200, 7]),
    ([(40, [3] * 8), (1, [100, 2])], [1025]),
    ([(64, [100] * 16)] * 3, [4097, 1]),  # long shared prefixes, many groups
    ([(20, [5] * SHARED_GROUP), (7, [2] * (SHARED_GROUP - 1))], [97]),  # full groups: several row blocks at GQA 8
]


def _errors(dtype, d, hkv, group, bs, groups, singles, fp8=False, **kw):
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    # groups as wide as the engine makes them for the kernel that takes them (the PF_SHARED kernel: not FP8)
    width = SHARED_GROUP_WIDE if cuda_attention.shared_kernel() == "prefill" and not fp8 else SHARED_GROUP
    kc, vc, ctx, bt, sp = shared_batch(groups, singles, bs, hkv, d, torch.float32, g, DEV, group=width)
    q = torch.randn((ctx.shape[0], hkv * group, d), generator=g).to(DEV, dtype)
    ks = vs = 1.0
    if fp8:
        ks, vs = 0.0371, 0.0113
        kc, vc = torch_ops.to_cache(kc * 3, torch.float8_e4m3fn, ks), torch_ops.to_cache(vc, torch.float8_e4m3fn, vs)
        kref, vref = kc.float() * ks, vc.float() * vs
    else:
        kc, vc = kc.to(dtype), vc.to(dtype)
        kref, vref = kc.float(), vc.float()
    scale = d**-0.5
    ref = torch_ops.decode_attention(q.float(), kref, vref, ctx, bt, scale)
    plain = cuda_ops.decode_attention(q, kc, vc, ctx, bt, scale, ks, vs, **kw)
    out = torch.full_like(q, float("nan"))
    got, lse = cuda_ops.decode_attention(q, kc, vc, ctx, bt, scale, ks, vs, shared=sp, out=out, return_lse=True,
                                         **kw)
    assert got is out
    _, lse_plain = cuda_ops.decode_attention(q, kc, vc, ctx, bt, scale, ks, vs, return_lse=True, **kw)
    state = cuda_attention._COUNTERS[(torch.device("cuda", torch.cuda.current_device()), "decode")]
    assert state.count_nonzero() == 0, "merge counters left set"
    e_plain = (plain.float() - ref).abs().max().item()
    e_got = (got.float() - ref).abs().max().item()
    assert e_got <= 2 * e_plain + 1e-3, f"seed {seed}: grouped {e_got:.3g}, plain {e_plain:.3g}"
    assert (lse - lse_plain).abs().max().item() < 1e-3 * (1 + lse_plain.abs().max().item()), f"lse, seed {seed}"


@pytest.mark.parametrize("kernel", cuda_attention.SHARED_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hkv,group", [(2, 1), (1, 3), (2, 4), (1, 8)])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_shared_prefix_decode(dtype, d, hkv, group, case, kernel, monkeypatch):
    """Both kernels of the shared part on a bf16 / fp16 cache: the decode kernel with the members as query heads
    (the default) and prefill_attention.cu's PF_SHARED variant (FLASHGEN_SHARED_KERNEL=prefill)."""
    monkeypatch.setenv("FLASHGEN_SHARED_KERNEL", kernel)
    groups, singles = CASES[case]
    _errors(dtype, d, hkv, group, [16, 64][case % 2], groups, singles)


@pytest.mark.parametrize("dtype,hkv,group,case", [
    (torch.bfloat16, 2, 1, 0), (torch.float16, 1, 3, 1), (torch.bfloat16, 2, 4, 3), (torch.float16, 1, 8, 4),
    (torch.bfloat16, 1, 4, 2), (torch.float16, 1, 8, 5)])
@pytest.mark.parametrize("kernel", cuda_attention.SHARED_KERNELS)
def test_shared_prefix_decode_hd256(dtype, hkv, group, case, kernel, monkeypatch):
    """Head_dim 256 (a subset): q_rows, the float32 output and the merge through the warp-pair kernel."""
    monkeypatch.setenv("FLASHGEN_SHARED_KERNEL", kernel)
    groups, singles = CASES[case]
    _errors(dtype, 256, hkv, group, [16, 64][case % 2], groups, singles)


@pytest.mark.parametrize("d", [128, pytest.param(256, id="hd256")])
@pytest.mark.parametrize("plan", ["split", "balanced", "warp"])
@pytest.mark.parametrize("num_splits", [1, 3, 64])
def test_shared_prefix_decode_splits_and_plans(plan, num_splits, d):
    _errors(torch.bfloat16, d, 2, 4, 16, CASES[3][0], CASES[3][1], num_splits=num_splits, plan=plan)


# the key-split cases: CASES' 3 to 5 (prefixes of 320 to 1,024 tokens: one or two splits), and groups whose prefixes
# of 4,160 and 1,600 tokens take 8 and 3 splits in one launch
SPLIT_CASES = [CASES[3], CASES[4], CASES[5], ([(260, [3, 9, 1]), (100, [2, 2, 40])], [5])]


@pytest.mark.parametrize("splits", ["1", "3", "8"])
@pytest.mark.parametrize("case", range(len(SPLIT_CASES)))
def test_shared_prefix_kernel_key_splits(splits, case, monkeypatch):
    """The PF_SHARED kernel's key splits (FLASHGEN_SHARED_SPLITS sets the grid's): each group takes one per 512 of its
    shared tokens, at most the grid's, so groups of one launch take different counts and the grid's other splits
    stay empty; the decode kernel's FG_MERGE_N variant merges them."""
    monkeypatch.setenv("FLASHGEN_SHARED_KERNEL", "prefill")
    monkeypatch.setenv("FLASHGEN_SHARED_SPLITS", splits)
    groups, singles = SPLIT_CASES[case]
    _errors(torch.bfloat16, 128, 2, 4, 16, groups, singles)


@pytest.mark.parametrize("d", [64, 128, pytest.param(256, id="hd256")])
def test_shared_prefix_decode_fp8_cache(d, monkeypatch):
    monkeypatch.setenv("FLASHGEN_SHARED_KERNEL", "prefill")  # FP8 caches take the decode kernel whatever it says
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the FP8 KV cache needs compute capability 8.9 or later")
    _errors(torch.bfloat16, d, 2, 4, 16, CASES[1][0], CASES[1][1], fp8=True)


@pytest.mark.parametrize("kernel", cuda_attention.SHARED_KERNELS)
@pytest.mark.parametrize("d", [64, 128, pytest.param(256, id="hd256")])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("case", range(len(SPLIT_CASES)))
def test_shared_prefix_overlapped(kernel, d, fp8, case, monkeypatch):
    """FLASHGEN_SHARED_OVERLAP=1: the shared part on a second stream beside the own parts, both states merged by
    merge_states_kernel, against the oracle as the sequential path is (_errors), over both kernels, head dims, the
    FP8 cache (the decode kernel for its shared part) and the key-split cases."""
    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the FP8 KV cache needs compute capability 8.9 or later")
    monkeypatch.setenv("FLASHGEN_SHARED_KERNEL", kernel)
    monkeypatch.setenv("FLASHGEN_SHARED_OVERLAP", "1")
    groups, singles = SPLIT_CASES[case]
    _errors(torch.bfloat16, d, 2, 4, 16, groups, singles, fp8=fp8)
    shared_state = cuda_attention._COUNTERS.get((torch.device("cuda", torch.cuda.current_device()), "decode_shared"))
    assert shared_state is None or shared_state.count_nonzero() == 0, "the shared launch's counters left set"


@pytest.mark.parametrize("kernel", cuda_attention.SHARED_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_overlapped_equals_sequential(kernel, dtype, monkeypatch):
    """The overlapped path's output and LSE are the sequential path's: the same merge steps in the same order
    (own state, then the splits), the output rounded once, so at most a rounding apart."""
    monkeypatch.setenv("FLASHGEN_SHARED_KERNEL", kernel)
    g = torch.Generator().manual_seed(_seed())
    width = SHARED_GROUP_WIDE if kernel == "prefill" else SHARED_GROUP
    groups, singles = SPLIT_CASES[3]
    kc, vc, ctx, bt, sp = shared_batch(groups, singles, 16, 2, 128, torch.float32, g, DEV, group=width)
    q = torch.randn((ctx.shape[0], 8, 128), generator=g).to(DEV, dtype)
    kc, vc = kc.to(dtype), vc.to(dtype)
    runs = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("FLASHGEN_SHARED_OVERLAP", flag)
        runs[flag] = cuda_ops.decode_attention(q, kc, vc, ctx, bt, 128**-0.5, shared=sp, return_lse=True)
    (o0, l0), (o1, l1) = runs["0"], runs["1"]
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(o1.float(), o0.float(), rtol=ulp, atol=ulp * o0.float().abs().max().item())
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel,overlap", [("decode", "0"), ("prefill", "0"), ("prefill", "1")])
def test_engine_graphs_with_groups_match_the_run_without(tmp_path, monkeypatch, kernel, overlap):
    """n = 8 samples and prompts behind one system prompt, greedy, on the CUDA kernels with their captured graphs:
    the decode steps run grouped (a grouped graph is captured), and every step's logits equal the run without
    groups' until the two runs' tokens first differ (random weights have near-ties: a token may flip). With either
    kernel for the shared part (the PF_SHARED one: wide groups, graphs per group bucket), and with the two parts
    on two streams (FLASHGEN_SHARED_OVERLAP=1: the graphs capture both streams)."""
    monkeypatch.setenv("FLASHGEN_SHARED_KERNEL", kernel)
    monkeypatch.setenv("FLASHGEN_SHARED_OVERLAP", overlap)
    from checkpoints import make_checkpoint
    from flashgen import LLM, SamplingParams
    from flashgen.engine import step_packing

    model = tmp_path / "m"
    make_checkpoint(model, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64,
                    intermediate_size=512, vocab_size=512, max_position_embeddings=2048)
    rng = random.Random(0)
    system = [rng.randrange(3, 500) for _ in range(300)]
    prompts = [system + [rng.randrange(3, 500) for _ in range(rng.randint(1, 60))] for _ in range(12)]
    params = [SamplingParams(temperature=0.0, n=8 if i % 3 == 0 else 1, max_tokens=32, ignore_eos=True)
              for i in range(12)]
    grouped = []
    real = step_packing.shared_prefix_groups
    monkeypatch.setattr(step_packing, "shared_prefix_groups", lambda *a: grouped.append(real(*a)) or grouped[-1])
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("FLASHGEN_SHARED_PREFIX", flag)
        llm = LLM(model=str(model), device="cuda", dtype="bfloat16", kv_cache_gb=0.05, max_num_seqs=64)
        runs[flag] = generate_logged(llm, prompts, params)
        runner = llm.engine.runner
        if flag == "1":
            assert runner.graphs is not None and any(ng for _, ng, _ in runner.graphs.graphs)
            assert sum(len(x) > 0 for x in grouped) >= 16
        del llm
    assert logits_match_until_tokens_differ(runs["1"], runs["0"]) >= len(runs["0"][0]) * 16


def generate_logged(llm, prompts, params) -> tuple[dict, dict]:
    """Generate, logging every sampled row's logits (the runner's on_logits hook): ({(prompt i, sample): token
    ids}, {(prompt i, sample): [logits row per step]}). The prompts must all differ."""
    log: dict = {}

    def hook(seqs, logits):
        for s, row in zip(seqs, logits.float().cpu(), strict=True):
            log.setdefault((tuple(s.token_ids[:s.num_prompt_tokens]), s.index), []).append(row)

    llm.engine.runner.on_logits = hook
    outs = llm.generate(prompts, params)
    return ({(i, c.index): c.token_ids for i, o in enumerate(outs) for c in o.outputs},
            {(prompts.index(list(p)), j): rows for (p, j), rows in log.items()})


def logits_match_until_tokens_differ(run, ref) -> int:
    """Every step's logits of `run` within 2^-5 of `ref`'s (relative to ref's largest) up to and including the
    first step whose token differs (random weights have near-ties: a token may flip, and the runs part there);
    the number of steps compared."""
    (tok_r, log_r), (tok_f, log_f) = run, ref
    compared = 0
    for key, toks in tok_f.items():
        same = next((i for i, (a, b) in enumerate(zip(toks, tok_r[key], strict=True)) if a != b), len(toks) - 1)
        for t in range(same + 1):
            a, b = log_r[key][t], log_f[key][t]
            assert (a - b).abs().max().item() <= 2**-5 * b.abs().max().item(), (key, t)
            compared += 1
    return compared
