"""The sampler's maths on the CPU, and the fused CUDA kernel against it on the GPU."""
from __future__ import annotations

import pytest
import torch

from flashgen.engine.sampler import SamplingBatch, gumbel_noise, sample


def batch(B, temperature=1.0, top_k=None, top_p=None, min_p=None, seeds=None, steps=None):
    f = lambda v: torch.full((B,), float(v))
    return SamplingBatch(
        temperature=f(temperature), top_k=None if top_k is None else torch.full((B,), top_k),
        top_p=None if top_p is None else f(top_p), min_p=None if min_p is None else f(min_p),
        seeds=torch.arange(B, dtype=torch.int64) * 7919 + 1 if seeds is None else seeds,
        steps=torch.zeros(B, dtype=torch.int64) if steps is None else steps, all_greedy=temperature == 0)


def test_samples_follow_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    B = 40000
    toks = sample(logits.expand(B, -1).clone(), batch(B, temperature=0.7))
    freq = torch.bincount(toks, minlength=5).float() / B
    want = (logits / 0.7).softmax(-1)
    assert (freq - want).abs().max() < 0.01, (freq, want)


def test_filters_keep_only_allowed_tokens():
    torch.manual_seed(0)
    logits = torch.randn(64, 1000) * 3
    for kw, allowed in [
        (dict(top_k=5), lambda l: l >= l.topk(5).values[-1]),
        (dict(min_p=0.2), lambda l: (l.softmax(-1) >= 0.2 * l.softmax(-1).max())),
    ]:
        toks = sample(logits.clone(), batch(64, **kw))
        assert all(allowed(logits[i])[t] for i, t in enumerate(toks.tolist())), kw
    # top_p: the chosen token lies inside the smallest set reaching p
    toks = sample(logits.clone(), batch(64, top_p=0.5))
    for i, t in enumerate(toks.tolist()):
        p = logits[i].softmax(-1)
        assert (p[p > p[t]]).sum() <= 0.5 + 1e-6


def test_noise_is_a_function_of_seed_step_and_token():
    a = gumbel_noise(torch.tensor([5, 6]), torch.tensor([3, 3]), 100)
    b = gumbel_noise(torch.tensor([9, 5]), torch.tensor([3, 3]), 100)
    assert torch.equal(a[0], b[1]) and not torch.equal(a[0], a[1])
    assert not torch.equal(a[0], gumbel_noise(torch.tensor([5]), torch.tensor([4]), 100)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,V,B", [(torch.float32, 151936, 256), (torch.bfloat16, 151936, 256),
                                       (torch.float16, 128256, 256), (torch.bfloat16, 50257, 256),
                                       (torch.float32, 50257, 256), (torch.bfloat16, 151936, 9),
                                       (torch.float32, 128256, 1)])
def test_fused_kernel_matches_torch_sampler(dtype, V, B):
    """The fused kernel reads float32 or model-dtype logits (vector loads, or a scalar loop when V is not a
    multiple of the vector), spreads the rows of a small batch over several CTAs, and picks what the torch
    sampler picks on their float32 values."""
    torch.manual_seed(1)
    logits = (torch.randn(B, V, device="cuda") * 2).to(dtype)
    if B > 5:
        logits[3, :] = float("-inf")
        logits[3, 17] = 0.0  # only one finite token
        logits[5, 1000:] = float("-inf")
    temps = torch.rand(B, device="cuda") + 0.2
    temps[::7] = 0.0  # greedy rows
    b = SamplingBatch(temperature=temps, top_k=None, top_p=None, min_p=None,
                      seeds=torch.randint(0, 2**62, (B,), device="cuda"),
                      steps=torch.randint(0, 5000, (B,), device="cuda"), all_greedy=False)
    ref = sample(logits.float(), b, fused=False)
    out = sample(logits.clone(), b, fused=True)
    if B > 5:
        assert out[3].item() == 17 and out[5].item() < 1000
    agree = (ref == out).float().mean().item()
    assert agree >= 0.99, agree  # fast logarithms differ from torch's log by a few ulp: a rare near-tie flips
    assert torch.equal(ref[temps == 0], out[temps == 0])


def test_apply_penalties_matches_hand_computed_vllm_rules():
    """Repetition over prompt + output (positive logits divided, negative multiplied, zero unchanged);
    presence once per token in the output; frequency per occurrence in the output. Expected values come from
    plain-Python loops, not from the function under test."""
    from flashgen.engine.sampler import apply_penalties

    V = 7
    logits_rows = [
        [3.0, -2.0, 0.0, 1.5, -0.5, 2.5, -4.0],
        [-1.0, 4.5, 0.0, -3.0, 2.0, 0.75, -0.25],
        [1.0, -1.0, 0.0, 2.0, -2.0, 3.0, 0.5],
    ]
    # (prompt, output, repetition, presence, frequency); row 2 has every penalty off
    rows = [
        ([0, 1, 2], [3, 3, 4, 0], 2.0, 0.5, 0.25),   # 1 (negative) and 2 (zero) only in the prompt
        ([4, 3, 6], [1, 1, 1, 2], 1.5, 0.0, 1.0),    # 4 (positive), 3 and 6 (negative) only in the prompt
        ([0, 5], [3, 3, 6], 1.0, 0.0, 0.0),
    ]

    seen, counts, want = [], [], []
    for logit_row, (prompt, output, rep, pres, freq) in zip(logits_rows, rows):
        seen_row = [False] * V
        for t in prompt + output:
            seen_row[t] = True
        count_row = [0.0] * V
        for t in output:
            count_row[t] += 1.0
        want_row = []
        for t in range(V):
            x = logit_row[t]
            if seen_row[t]:
                if x > 0:
                    x = x / rep
                else:
                    x = x * rep
            x = x - freq * count_row[t]
            if count_row[t] > 0:
                x = x - pres
            want_row.append(x)
        seen.append(seen_row)
        counts.append(count_row)
        want.append(want_row)

    # spot checks of the hand rules on a few entries
    assert want[0][0] == 3.0 / 2.0 - 0.25 - 0.5       # prompt + output, positive
    assert want[0][1] == -2.0 * 2.0                   # prompt only, negative: repetition alone
    assert want[0][2] == 0.0                          # prompt only, zero
    assert want[0][3] == 1.5 / 2.0 - 2 * 0.25 - 0.5   # output twice
    assert want[1][4] == 2.0 / 1.5                    # prompt only, positive
    assert want[1][1] == 4.5 / 1.5 - 3 * 1.0          # output three times, presence 0
    assert want[2] == logits_rows[2]                  # all penalties off

    f32 = dict(dtype=torch.float32)
    b = SamplingBatch(
        temperature=torch.ones(3), top_k=None, top_p=None, min_p=None,
        seeds=torch.arange(3, dtype=torch.int64), steps=torch.tensor([len(r[1]) for r in rows]),
        all_greedy=False,
        rep_penalty=torch.tensor([r[2] for r in rows], **f32),
        presence=torch.tensor([r[3] for r in rows], **f32),
        frequency=torch.tensor([r[4] for r in rows], **f32),
        seen_prompt=torch.tensor(seen, dtype=torch.bool),
        out_counts=torch.tensor(counts, **f32),
    )
    logits = torch.tensor(logits_rows, **f32)
    before = logits.clone()
    out = apply_penalties(logits, b)
    assert out.dtype == torch.float32 and out.shape == (3, 7)
    torch.testing.assert_close(out, torch.tensor(want, **f32), rtol=0, atol=1e-6)
    assert torch.equal(logits, before)  # input left as it was
