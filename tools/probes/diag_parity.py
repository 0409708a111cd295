"""Diagnose bf16 greedy parity with HF on random weights: logits errors vs an fp32 oracle, and where and why
greedy outputs diverge (the fp32 top-2 margin at the first divergence). Usage:
  PYTHONPATH=. python3 tools/probes/diag_parity.py [shape] [backend] [init_std]"""
import random
import sys
import tempfile

import torch
import transformers

from flashgen import LLM, SamplingParams
from flashgen.bench.synthetic import write_model_dir

shape = sys.argv[1] if len(sys.argv) > 1 else "qwen3-0.6b"
backend = sys.argv[2] if len(sys.argv) > 2 else "cuda"
std = float(sys.argv[3]) if len(sys.argv) > 3 else 0.02
d = write_model_dir(shape, tempfile.mkdtemp())
cfg = transformers.AutoConfig.from_pretrained(d)
cfg.initializer_range = std
torch.manual_seed(0)
with torch.device("cuda"):
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
hf.generation_config.eos_token_id = None
llm = LLM(model=str(d), load_format="dummy", dtype="bfloat16", kv_cache_gb=4, max_num_seqs=32, max_model_len=4096,
          backend=backend, enforce_eager=backend == "torch")
llm.engine.runner.model.load_hf_state_dict(hf.state_dict())
rng = random.Random(0)
prompts = [[rng.randrange(0, 10000) for _ in range(rng.randint(1, 300))] for _ in range(32)]
outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))


def hf_greedy(model):
    res = []
    for p in prompts:
        res.append(model.generate(torch.tensor([p], device="cuda"), max_new_tokens=64, do_sample=False,
                                  pad_token_id=0)[0, len(p):].tolist())
    return res


ref16 = hf_greedy(hf)
ids = prompts[3]
with torch.no_grad():
    l16 = hf(torch.tensor([ids], device="cuda")).logits[0].double()
ours = llm.prompt_logits(ids).double()
hf.float()
with torch.no_grad():
    l32 = hf(torch.tensor([ids], device="cuda")).logits[0].double()
ref32 = hf_greedy(hf)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


print(f"{shape} backend={backend} std={std}: logits rel err vs fp32: ours {rel_err(ours, l32):.3e}  "
      f"HF-bf16 {rel_err(l16, l32):.3e}")
print(f"  logits std {l32.std().item():.3f}; top1-top2 margin median "
      f"{(l32.topk(2).values[:, 0] - l32.topk(2).values[:, 1]).median().item():.4f}")
same_hf = sum(o.token_ids == r for o, r in zip(outs, ref16, strict=True))
same_32 = sum(o.token_ids == r for o, r in zip(outs, ref32, strict=True))
hf_vs_32 = sum(a == b for a, b in zip(ref16, ref32, strict=True))
print(f"  identical 64 tokens: ours=HFbf16 {same_hf}/32, ours=HFfp32 {same_32}/32, HFbf16=HFfp32 {hf_vs_32}/32")
for o, r, p in list(zip(outs, ref32, prompts, strict=True))[:32]:
    if o.token_ids != r:
        k = next(i for i, (a, b) in enumerate(zip(o.token_ids, r, strict=True)) if a != b)
        seq = p + r[:k]
        with torch.no_grad():
            lg = hf(torch.tensor([seq], device="cuda")).logits[0, -1].double()
        top = lg.topk(2)
        print(f"  prompt len {len(p)}: diverges at {k}; fp32 margin {top.values[0] - top.values[1]:.4f}, "
              f"ours chose rank {(lg > lg[o.token_ids[k]]).sum().item()}")
