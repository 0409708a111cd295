"""An engine decode step does not make the host wait for the GPU: the engine launches step N + 1 while step N
runs, so anything in a step's launch that waits for the stream (a read of a device value, a large copy up from
pageable memory, an allocation that synchronizes) would put the launch of N + 1 after the end of N. A steady decode
step is launched with half a second of GPU work queued in front of it and must return while that work runs."""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.gpu


def _spin(seconds: float) -> torch.cuda.Event:
    """Queue `seconds` of GPU spinning on the current stream; the event after it."""
    torch.cuda._sleep(int(seconds * torch.cuda.get_device_properties(0).clock_rate * 1e3))
    done = torch.cuda.Event()
    done.record()
    return done


def test_engine_step_does_not_wait_for_the_work_queued_before_it(tmp_path):
    """In a steady decode (graphs captured, tokens in device slots) one engine step with 0.5 s of GPU work queued in
    front of it returns while that work runs: it packs, copies and launches the next step, and reads the tokens of
    the step before (queued before the work), without waiting for the stream."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from flashgen import LLM, SamplingParams
    from flashgen.bench.synthetic import write_model_dir

    llm = LLM(model=str(write_model_dir("qwen3-0.6b", tmp_path)), load_format="dummy", dtype="bfloat16",
              kv_cache_gb=2, max_num_seqs=16, max_model_len=2048)
    rng = random.Random(0)
    sp = SamplingParams(max_tokens=100, ignore_eos=True, temperature=0.8, seed=1)
    for i in range(12):
        llm.add_request(f"r{i}", [rng.randrange(3, 10000) for _ in range(rng.randint(20, 300))], sp)
    for _ in range(10):  # the prefill, then decode steps: every graph this batch needs is captured
        llm.step()
    torch.cuda.synchronize()
    done = _spin(0.5)
    llm.step()
    still_running = not done.query()
    outs = []
    while llm.has_unfinished_requests():
        outs += llm.step()
    assert still_running, "an engine step waited for the GPU work queued before it"
    assert len(outs) == 12 and all(len(o.outputs[0].token_ids) == 100 for o in outs)
