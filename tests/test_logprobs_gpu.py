"""Logprobs on the GPU (bf16, CUDA kernels, pipelined decode, CUDA graphs) against HF transformers in fp32; the
tolerance is tied to HF's own bf16 error against the same fp32 oracle on the same tokens."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU; none is visible", allow_module_level=True)


def test_logprobs_within_hf_bf16s_own_error(tmp_path):
    import random

    import transformers

    from checkpoints import make_checkpoint
    from flashgen import LLM, SamplingParams

    d = make_checkpoint(tmp_path / "m", hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=64,
                        intermediate_size=256, vocab_size=512)
    llm = LLM(model=str(d), dtype="bfloat16", kv_cache_gb=0.25, max_num_seqs=16)
    assert llm.engine.runner.backend == "cuda"
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(2, 150))] for _ in range(8)]
    sps = [SamplingParams(temperature=t, seed=i, max_tokens=24, ignore_eos=True, logprobs=5, prompt_logprobs=2)
           for i, t in enumerate([0.0, 1.0] * 4)]
    outs = llm.generate(prompts, sps)
    hf32 = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).cuda().eval()
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
    ours, theirs = [], []
    for out in outs:
        ids = out.prompt_token_ids + out.token_ids
        x = torch.tensor([ids], device="cuda")
        with torch.no_grad():
            ref = torch.log_softmax(hf32(x).logits[0].double(), -1)
            h16 = torch.log_softmax(hf16(x).logits[0].double(), -1)
        n = len(out.prompt_token_ids)
        assert len(out.logprobs) == len(out.token_ids) and len(out.prompt_logprobs) == n
        for p in range(1, len(ids)):
            chosen = out.prompt_logprobs[p] if p < n else out.logprobs[p - n]
            assert chosen is not None and ids[p] in chosen
            ours.append(abs(chosen[ids[p]].logprob - ref[p - 1, ids[p]].item()))
            theirs.append(abs(h16[p - 1, ids[p]].item() - ref[p - 1, ids[p]].item()))
    ours_t, theirs_t = torch.tensor(ours), torch.tensor(theirs)
    # the same precision as HF bf16, not bit-equal: mean and tail within 2x of HF's own error (plus a floor)
    assert ours_t.mean() <= 2 * theirs_t.mean() + 1e-3, (ours_t.mean(), theirs_t.mean())
    assert ours_t.max() <= 2 * theirs_t.max() + 1e-2, (ours_t.max(), theirs_t.max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R,V", [(1, 97), (7, 1000), (300, 32000), (33, 151936), (5, 50257)])
@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_logprobs_kernel_matches_the_torch_pack(dtype, R, V, k):
    """kernels/logprobs.cu against pack_logprobs' torch code on random logits with ties (values rounded to a
    coarse grid), a -inf logit, strided rows and a token -1: logprobs within float32 rounding, ranks exact, the
    top-k values exact and its ids holding exactly those values (the order of equal logits may differ)."""
    from flashgen.engine.logprobs import pack_logprobs

    g = torch.Generator(device="cuda").manual_seed(R * 1000 + V + k)
    wide = (torch.randn((R, V + 3), generator=g, device="cuda") * 4).round(decimals=1).to(dtype)
    wide[0, 5 % V] = float("-inf")
    x = wide[:, :V]  # rows V + 3 apart: strided
    tokens = torch.randint(0, V, (R,), generator=g, device="cuda")
    tokens[-1] = -1
    got = pack_logprobs(x, tokens, k, fused=True)
    ref = pack_logprobs(x, tokens, k)
    assert got.shape == ref.shape == (R, 2 + 2 * k)
    torch.testing.assert_close(got[:, 0], ref[:, 0], rtol=0, atol=2e-5)
    assert torch.equal(got[:, 1], ref[:, 1]), "ranks differ"
    if k:
        torch.testing.assert_close(got[:, 2:2 + k], ref[:, 2:2 + k], rtol=0, atol=2e-5)
        ids = got[:, 2 + k:].long()
        assert torch.equal(x.float().gather(1, ids), x.float().topk(k, -1).values), "top-k ids hold other values"
        assert all(len(set(r)) == k for r in ids.tolist()), "a top-k id repeats"
