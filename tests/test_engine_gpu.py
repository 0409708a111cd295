"""GPU parity with HF transformers on bf16 random weights of real model shapes (run on the device).

With HF's random initialisation the logits are nearly flat: the top-2 margin is often below bf16 rounding, so
two correct bf16 implementations (HF's own bf16 against its fp32 included) part ways on most 64-token greedy runs.
The test therefore holds flashgen to what bf16 allows, against an fp32 oracle on the same weights:
  * first-step logits: err(flashgen bf16) <= 2 * err(HF bf16) + 1e-3;
  * greedy: at least as many prompts identical to the oracle as HF bf16 manages (minus 2), and every
    divergence happens at a near-tie: the oracle's logit for flashgen's token is within 8x the RMS logit error
    (measured above) of its best.
"""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.gpu


def _pair(shape: str, tmp_path):
    import transformers

    from flashgen import LLM
    from flashgen.bench.synthetic import write_model_dir

    d = write_model_dir(shape, tmp_path)
    cfg = transformers.AutoConfig.from_pretrained(d)
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: an 8B CPU init takes minutes
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    hf.generation_config.eos_token_id = None
    llm = LLM(model=str(d), load_format="dummy", dtype="bfloat16", kv_cache_gb=4, max_num_seqs=32,
              max_model_len=4096)
    llm.engine.runner.model.load_hf_state_dict(hf.state_dict())
    return hf, llm


def _greedy(hf, prompts, n):
    L = max(map(len, prompts))
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # one left-padded batch: HF derives positions from the mask
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    out = hf.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, L:].tolist()


@torch.no_grad()
@pytest.mark.parametrize("shape", ["qwen3-0.6b", "llama-3.1-8b"])
def test_greedy_and_logits_match_hf_bf16(shape, tmp_path):
    from flashgen import SamplingParams

    hf, llm = _pair(shape, tmp_path)
    rng = random.Random(0)
    prompts = [[rng.randrange(0, 10000) for _ in range(rng.randint(1, 300))] for _ in range(32)]
    ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))]
    ref16 = _greedy(hf, prompts, 64)
    probe = prompts[3]
    l_ours = llm.prompt_logits(probe)[-1].double()
    l16 = hf(torch.tensor([probe], device="cuda")).logits[0, -1].double()
    hf.float()
    l32 = hf(torch.tensor([probe], device="cuda")).logits[0, -1].double()
    ref32 = _greedy(hf, prompts, 64)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    err, err_hf = rel(l_ours, l32), rel(l16, l32)
    rms = (l_ours - l32).pow(2).mean().sqrt().item()
    same_hf16 = sum(a == b for a, b in zip(ours, ref16, strict=True))
    same_32 = sum(a == b for a, b in zip(ours, ref32, strict=True))
    hf_32 = sum(a == b for a, b in zip(ref16, ref32, strict=True))
    print(f"\n{shape}: logits rel err vs fp32: flashgen {err:.2e}, HF bf16 {err_hf:.2e} (rms {rms:.2e}); "
          f"64-token greedy identical: flashgen=HF-bf16 {same_hf16}/32, flashgen=fp32 {same_32}/32, "
          f"HF-bf16=fp32 {hf_32}/32")
    assert err <= 2 * err_hf + 1e-3
    # HF bf16's own count read 8 to 10 over four runs with the same weights on one machine, so one HF run is no
    # fixed bar; the near-tie check below is the strict one
    assert same_32 >= hf_32 - 3
    for p, a, b in zip(prompts, ours, ref32, strict=True):
        if a == b:
            continue
        k = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        lg = hf(torch.tensor([p + b[:k]], device="cuda")).logits[0, -1].double()
        top = lg.topk(2)
        margin = (top.values[0] - top.values[1]).item()
        print(f"  prompt of {len(p)}: diverges at token {k}; oracle margin {margin:.4f}; ours = oracle's "
              f"#{int((lg > lg[a[k]]).sum()) + 1}")
        gap = (lg.max() - lg[a[k]]).item()
        assert gap <= 8 * rms, f"a divergence that is not a near-tie: oracle prefers its token by {gap:.4f}"
