"""GPU parity with HF transformers on bf16 random weights of real model shapes (run on the device)."""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.gpu


def _pair(shape: str, tmp_path, num_layers: int | None = None):
    import transformers

    from flashgen import LLM
    from flashgen.bench.synthetic import write_model_dir

    d = write_model_dir(shape, tmp_path)
    cfg = transformers.AutoConfig.from_pretrained(d)
    if num_layers:
        cfg.num_hidden_layers = num_layers
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU: an 8B CPU init takes minutes
        hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    hf.generation_config.eos_token_id = None
    if num_layers:
        import json
        c = json.loads((d / "config.json").read_text())
        c["num_hidden_layers"] = num_layers
        (d / "config.json").write_text(json.dumps(c))
    llm = LLM(model=str(d), load_format="dummy", dtype="bfloat16", kv_cache_gb=4, max_num_seqs=32,
              max_model_len=4096)
    llm.engine.runner.model.load_hf_state_dict(hf.state_dict())
    return hf, llm


@pytest.mark.parametrize("shape,layers", [("qwen3-0.6b", None), ("llama-3.1-8b", None)])
def test_greedy_matches_hf_bf16(shape, layers, tmp_path):
    from flashgen import SamplingParams

    hf, llm = _pair(shape, tmp_path, layers)
    rng = random.Random(0)
    prompts = [[rng.randrange(0, 10000) for _ in range(rng.randint(1, 300))] for _ in range(32)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    L = max(map(len, prompts))
    ids = torch.zeros(32, L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # one left-padded HF batch: positions follow the mask
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    ref = hf.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=64, do_sample=False,
                      pad_token_id=0)[:, L:].tolist()
    same = sum(o.token_ids == r for o, r in zip(outs, ref))
    print(f"{shape}: {same}/32 prompts token-identical for 64 tokens")
    assert same >= 30
    # first-step logits: flashgen bf16 vs HF bf16, both against HF in fp32 on the same weights
    ids = prompts[0][:97] if len(prompts[0]) >= 97 else prompts[0]
    ours = llm.prompt_logits(ids)[-1].double()
    with torch.no_grad():
        ref16 = hf(torch.tensor([ids], device="cuda")).logits[0, -1].double()
        hf32 = hf.float()
        ref32 = hf32(torch.tensor([ids], device="cuda")).logits[0, -1].double()
    err = ((ours - ref32).norm() / ref32.norm()).item()
    err_hf = ((ref16 - ref32).norm() / ref32.norm()).item()
    print(f"{shape}: first-step logits rel err {err:.2e} (HF bf16: {err_hf:.2e})")
    assert err <= 2 * err_hf + 1e-3
