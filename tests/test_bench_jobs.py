"""`flashgen bench jobs` on the CPU: each workload at a tiny scale on the tiny shape through the real job path, its
report's fields and their consistency; the floor's prefix counting and the instrumentation's clean exit."""
from __future__ import annotations

import random
from array import array

import pytest

from flashgen.bench import jobs
from flashgen.bench.throughput import Workload, distinct_prefix_tokens, floor_from_lengths, floor_seconds
from test_cli_support import cli

# Each workload's smallest scale that still has a few lines: extract 10, synth 2, summarize 1.
CPU = dict(shape="tiny", device="cpu", kv_cache_gb=0.05, max_num_batched_tokens=2048)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> tuple[str, bool]:
    """(tokenizer directory, whether it is the real BPE one): the embedded model's when it is installed, else the
    benchmarks' byte-level one (no chat template: the bench gives it one)."""
    try:
        from flashgen.models.default_model import DEFAULT_MODEL, resolve_model

        return resolve_model(DEFAULT_MODEL), True
    except (ImportError, OSError, ValueError):
        from flashgen.bench.synthetic import write_model_dir

        return str(write_model_dir("tiny", tmp_path_factory.mktemp("bytes"))), False


@pytest.mark.parametrize("name", list(jobs.WORKLOADS))
def test_workload_runs_through_the_job_path(name, tokenizer, tmp_path):
    tok_dir, real = tokenizer
    w = jobs.WORKLOADS[name]
    res = jobs.main(name, 0.0005, tok_dir, str(tmp_path), **CPU)
    n = jobs.scaled_lines(w, 0.0005)
    assert (tmp_path / f"jobs_{name}.json").is_file()
    assert res["lines"] == n and res["max_tokens"] == w.max_tokens and res["ignore_eos"] is True
    assert res["format"] == ("openai_batch" if w.batch_format else "messages")
    # every line got a result record, and generated exactly max_tokens
    assert res["records"] == res["result_records"] == res["exact_length_records"] == res["distinct_ids"] == n
    assert res["output_tokens"] == n * w.max_tokens and res["job"]["ok"] == n and res["job"]["errors"] == 0
    # the breakdown: every named part, none negative, together at most the wall time
    b = res["breakdown"]
    assert list(b) == list(jobs.LABELS)
    assert all(v >= 0 for v in b.values()), b
    assert sum(b.values()) == pytest.approx(res["wall_s"]) and sum(b.values()) - b["other_s"] <= res["wall_s"]
    assert b["input_s"] > 0 and b["prefill_s"] > 0 and b["decode_s"] > 0 and b["startup_s"] > 0
    assert res["detail"]["model_load_s"] <= b["startup_s"] + b["input_s"] + b["admit_s"]
    assert res["floor_s"] is None and res["pct_of_floor"] is None  # no GPU ceilings on the CPU
    # the prompt as the job tokenized it holds the line's text (and the instruction) plus the chat template
    tt, pt = res["text_tokens"], res["prompt_tokens"]
    assert pt["min"] > tt["min"] + res["instruction_tokens"] - 5 and pt["total"] >= tt["total"]
    assert res["distinct_prompt_tokens"] <= pt["total"]
    if w.instruction_tokens and n > 1:  # the shared instruction is computed once: the rest come from the cache
        assert res["distinct_prompt_tokens"] < pt["total"] - (n - 1) * res["instruction_tokens"] + n
        assert res["detail"]["cached_tokens"] > 0
        if "piece_hits" in res["detail"]:  # and tokenized once: every line after the first two reuses its ids
            assert res["detail"]["piece_hits"] == n - 2 and "tokenized once and reused" in jobs.report(res)
    gpu = jobs.report({**res, "floor_s": 1.0, "pct_of_floor": 50.0, "copy_bytes_per_s": 3e12,
                       "matmul_flop_per_s": 7e14})  # the lines a GPU run prints
    assert "50% of floor" in gpu and "3.00 TB/s" in gpu and "start-up" in gpu
    if real:  # the stated ranges hold in the real BPE tokenizer's tokens
        lo, hi = w.text_tokens
        assert lo <= tt["min"] <= tt["max"] <= hi
        if w.instruction_tokens:
            assert abs(res["instruction_tokens"] - w.instruction_tokens) <= w.instruction_tokens * 0.05


@pytest.mark.parametrize("name", ["extract", "synth"])  # an OpenAI batch job and a native messages job
def test_spread_lengths_give_each_line_its_own_max_tokens(name, tokenizer, tmp_path):
    tok_dir, _ = tokenizer
    w = jobs.WORKLOADS[name]
    scale = 20 / w.lines
    n = jobs.scaled_lines(w, scale)
    outs = jobs.output_lengths(w, n, "spread")
    assert outs == jobs.output_lengths(w, n, "spread")  # seeded
    assert all(w.max_tokens // 8 <= m <= w.max_tokens for m in outs) and len(set(outs)) > n // 2
    assert jobs.output_lengths(w, n) == [w.max_tokens] * n
    res = jobs.main(name, scale, tok_dir, str(tmp_path), lengths="spread", **CPU)
    # each line generated exactly its own limit, read from the line (the job's default is the workload's)
    assert res["records"] == res["result_records"] == res["exact_length_records"] == n
    assert res["output_tokens"] == sum(outs) and res["lengths"] == "spread"
    assert res["line_max_tokens"]["total"] == sum(outs)
    assert "exactly its own max_tokens" in jobs.report(res)
    with pytest.raises(ValueError, match="lengths 'eos' is unknown"):
        jobs.output_lengths(w, n, "eos")


def test_texts_are_seeded_and_in_range():
    enc = [0]

    def encode(s: str) -> list[int]:  # a tokenizer of one token per word or mark
        enc[0] += 1
        return s.replace(",", " ,").replace(".", " .").split()

    def measure(texts):
        return [len(encode(t)) for t in texts]

    w = jobs.WORKLOADS["extract"]
    a = jobs.make_texts(w, 30, encode, measure)
    assert a == jobs.make_texts(w, 30, encode, measure)
    instruction, texts, counts = a
    assert counts == measure(texts) and all(50 <= c <= 300 for c in counts)
    assert abs(len(encode(instruction)) - 1000) <= 50
    assert all(t[0].isupper() and t.endswith(".") for t in texts)


def test_distinct_tokens_is_the_prefix_trie():
    rng = random.Random(1)
    shared = [rng.randrange(50) for _ in range(40)]
    prompts = [shared[:rng.randint(0, 40)] + [rng.randrange(3) for _ in range(rng.randint(0, 20))]
               for _ in range(60)] + [shared, shared, [7]]
    assert jobs.distinct_tokens([array("i", p) for p in prompts]) == distinct_prefix_tokens(prompts)


def test_floor_counts_a_shared_prefix_once(tmp_path):
    from flashgen.bench.synthetic import write_model_dir
    from flashgen.models.spec import load_spec

    spec = load_spec(write_model_dir("qwen3-0.6b", tmp_path))
    ceil = {"copy_bytes_per_s": 3e12, "matmul_flop_per_s": 7e14}
    prefix = list(range(1000))
    prompts = [prefix + [2000 + i, 3000 + i] for i in range(20)]
    w = Workload("t", "qwen3-0.6b", prompts, [64] * 20)
    wb = 2 * 10**9
    assert floor_from_lengths([len(p) for p in prompts], [64] * 20, distinct_prefix_tokens(prompts), spec, wb,
                              ceil) == floor_seconds(w, spec, wb, ceil)
    lens = [len(p) for p in prompts]
    shared = jobs.job_floor(spec, lens, jobs.distinct_tokens([array("i", p) for p in prompts]), 64, ceil)
    unshared = jobs.job_floor(spec, lens, sum(lens), 64, ceil)
    assert 0 < shared < unshared
    # each line's own max_tokens: the same as one for all when they are equal, less when some are shorter
    d = jobs.distinct_tokens([array("i", p) for p in prompts])
    assert jobs.job_floor(spec, lens, d, [64] * 20, ceil) == shared
    assert jobs.job_floor(spec, lens, d, [8] * 10 + [64] * 10, ceil) < shared


def test_floor_of_a_mixture_of_experts_and_of_sliding_windows(tmp_path):
    """The MoE floor reads the experts a step's live tokens are expected to activate (E (1 - (1 - k/E)^live)), and
    prefill computes with the active parameters; a sliding-window layer's KV counts only the window."""
    import dataclasses

    from flashgen.bench.synthetic import write_model_dir
    from flashgen.bench.throughput import active_params, moe_step_weight_bytes, weight_bytes_of
    from flashgen.models.spec import load_spec

    moe = load_spec(write_model_dir("qwen3-30b-a3b", tmp_path / "moe"))
    wb = weight_bytes_of(moe)
    expert = 3 * 2048 * 768 * 2 * 48  # one expert index's projections over the 48 MoE layers
    step = moe_step_weight_bytes(moe, wb)
    assert step(1) == pytest.approx(wb - 128 * expert + 8 * expert)  # one token: its 8 experts
    assert step(1) < step(8) < step(64) < step(4096) <= wb and step(4096) == pytest.approx(wb)
    assert active_params(moe, wb) == pytest.approx((wb - 120 * expert) / 2)
    assert 3.2e9 < active_params(moe, wb) < 3.5e9  # "A3B": ~3.3B parameters per token
    gemma = load_spec(write_model_dir("gemma3-4b", tmp_path / "gemma"))
    full = dataclasses.replace(gemma, local_layers=())
    ceil = {"copy_bytes_per_s": 3e12, "matmul_flop_per_s": 7e14}
    lens, outs = [3000, 200, 5000], [64, 64, 64]
    windowed = floor_from_lengths(lens, outs, sum(lens), gemma, 10**9, ceil)
    assert windowed < floor_from_lengths(lens, outs, sum(lens), full, 10**9, ceil)
    short = [100, 200, 300]  # no context reaches the 1,024-token window: the windows change nothing
    assert floor_from_lengths(short, outs, sum(short), gemma, 10**9, ceil) == pytest.approx(
        floor_from_lengths(short, outs, sum(short), full, 10**9, ceil))


def test_floor_at_the_engines_limits(tmp_path):
    """Admitting the requests in order into max_seqs slots and a KV cache of kv_capacity tokens: with room for
    all of them it is the everything-resident floor; fewer slots or less cache mean more decode steps, each
    reading the weights, so a higher floor; a request larger than the cache still runs (alone)."""
    from flashgen.bench.synthetic import write_model_dir
    from flashgen.models.spec import load_spec

    spec = load_spec(write_model_dir("qwen3-0.6b", tmp_path))
    ceil = {"copy_bytes_per_s": 3e12, "matmul_flop_per_s": 7e14}
    rng = random.Random(5)
    lens = [rng.randint(100, 1000) for _ in range(40)]
    outs = [rng.randint(10, 200) for _ in range(40)]
    wb = 2 * 10**9
    resident = floor_from_lengths(lens, outs, sum(lens), spec, wb, ceil)
    assert floor_from_lengths(lens, outs, sum(lens), spec, wb, ceil, max_seqs=40,
                              kv_capacity=10**9) == pytest.approx(resident)
    slots = floor_from_lengths(lens, outs, sum(lens), spec, wb, ceil, max_seqs=8)
    cache = floor_from_lengths(lens, outs, sum(lens), spec, wb, ceil, max_seqs=40, kv_capacity=3000)
    assert resident < slots and resident < cache
    # 8 slots: at least sum(outs) / 8 decode steps, each reading the weights
    assert slots >= (sum(outs) / 8) * wb / ceil["copy_bytes_per_s"]
    tiny = floor_from_lengths(lens, outs, sum(lens), spec, wb, ceil, kv_capacity=50)  # no request fits: one at a time
    assert tiny == pytest.approx(floor_from_lengths(lens, outs, sum(lens), spec, wb, ceil, max_seqs=1))


def test_instrumentation_leaves_the_job_code_as_it_was():
    from flashgen.jobs import generate

    runner = generate.Runner
    with pytest.raises(KeyError), jobs.instrumented(jobs.JobClock()):
        assert generate.Runner is not runner
        raise KeyError("a failing job")
    assert generate.Runner is runner


def test_cli_and_bad_arguments(tmp_path):
    r = cli(["bench", "jobs", "--help"], cwd=tmp_path)
    assert r.exit_code == 0 and "--workload" in r.stdout and "--scale" in r.stdout and "--lengths" in r.stdout
    with pytest.raises(ValueError, match="unknown"):
        jobs.main("translate", device="cpu")
    with pytest.raises(ValueError, match="scale"):
        jobs.main("extract", 0.0, device="cpu")


def _replayed(timeline, host_ms=None, host=None, allocator=None) -> dict:
    """GpuSteps' summary of a made-up stream timeline, [(prefill, rows, GPU start ms, GPU end ms)] (its events
    are injected: no GPU here; the clocks' origin event reads 0 ms at the host's 0 s), each launch running on the
    host's clock from host[i][0] to host[i][1] ms (default: from 0 to host_ms[i], 0 unless given); every step goes
    through the wrapped launch."""
    from types import SimpleNamespace

    stamps = iter([0.0] + [t for *_, a, b in timeline for t in (a, b)])
    if host is None:
        host = [(0.0, ms) for ms in (host_ms or [0.0] * len(timeline))]
    clock = iter([0.0] + [t / 1e3 for pair in host for t in pair])

    class Event:
        def record(self):
            self.t = next(stamps)

        def elapsed_time(self, other):
            return other.t - self.t

    runner = SimpleNamespace(launch=lambda batch: "launched")
    counters = iter(allocator or [{}, {}])
    steps = jobs.GpuSteps(runner, event=Event, synchronize=lambda: None, clock=lambda: next(clock),
                          memory_stats=lambda: next(counters))
    for prefill, rows, *_ in timeline:
        assert runner.launch(SimpleNamespace(is_prefill=prefill, seqs=[None] * rows)) == "launched"
    return steps.summary()


def test_gpu_steps_sum_each_kind_and_the_idle_time_between_steps():
    """GpuSteps' accounting: each step's span goes to its kind, and the time from one step's end to the next one's
    start is idle only when positive (the host queued the next step after the GPU had finished the last)."""
    # a prefill, two decode steps back to back, one that waited on the host for 3 ms, and a decode step queued
    # while the last was still running (its start reads earlier)
    got = _replayed([(True, 4, 0.0, 10.0), (False, 4, 10.0, 12.0), (False, 4, 12.0, 14.0), (False, 3, 17.0, 19.0),
                     (False, 3, 18.5, 21.0)])
    assert got["prefill"] == {"steps": 1, "gpu_s": pytest.approx(0.010), "rows": 4, "host_launch_s": 0.0,
                              "late_launches": 0, "late_launch_s": 0.0}
    assert got["decode"] == {"steps": 4, "gpu_s": pytest.approx(0.0085), "rows": 14, "host_launch_s": 0.0,
                             "late_launches": 0, "late_launch_s": 0.0}
    assert got["idle_between_steps_s"] == pytest.approx(0.003)
    assert got["idle_by_transition"] == {"decode>decode": {"s": pytest.approx(0.003), "gaps": 1}}
    assert got["longest_idle_s"] == pytest.approx(0.003)


def test_gpu_steps_split_the_idle_time_by_transition_and_the_report_prints_it():
    """Gaps after a prefill and after a decode step are counted apart, with the longest; the report prints them and
    the decode graphs captured during the job."""
    got = _replayed([(True, 4, 0.0, 10.0), (False, 4, 12.0, 14.0), (True, 2, 15.0, 20.0), (False, 6, 20.0, 22.0),
                     (False, 6, 22.5, 24.0)], host_ms=[30.0, 1.5, 20.0, 2.0, 2.5])
    assert got["idle_by_transition"] == {"prefill>decode": {"s": pytest.approx(0.002), "gaps": 1},
                                         "decode>prefill": {"s": pytest.approx(0.001), "gaps": 1},
                                         "decode>decode": {"s": pytest.approx(0.0005), "gaps": 1}}
    assert got["idle_between_steps_s"] == pytest.approx(0.0035) and got["longest_idle_s"] == pytest.approx(0.002)
    lines = jobs.report_lines_gpu(got, {"count": 3, "s": 0.125})
    assert lines[1] == ("  idle by transition: decode>decode 0.00 s over 1 gaps, decode>prefill 0.00 s over 1 gaps, "
                        "prefill>decode 0.00 s over 1 gaps; the longest 2.0 ms")
    assert lines[2] == "  decode graphs captured during the job (inside its steps): 3, 0.12 s"
    assert got["prefill"]["host_launch_s"] == pytest.approx(0.050)
    assert got["decode"]["host_launch_s"] == pytest.approx(0.006)
    assert lines[3] == "  host time inside the launches: prefill 0.05 s, decode 0.01 s (2.00 ms a step)"


def test_gpu_steps_count_the_launches_still_running_when_the_gpu_reached_their_step():
    """The host's clock and the stream's on one timeline: a launch that ends before the GPU reaches its step
    (queued ahead) is not late; one that the GPU reached while the host was still queuing it is, by the host's time
    from that moment to the launch's end; the report prints both kinds."""
    got = _replayed(
        # prefill 0-40 ms on the GPU, launched 0-30 ms: the GPU reached it at 0 while the host queued for 30 ms
        # decode 40-45, launched 31-33 (queued ahead of the GPU's 40 ms): not late
        # prefill 45-85, launched 34-60: the GPU reached it at 45, the host queued until 60: 15 ms late
        # decode 85-90, launched 61-62: not late
        # decode 95-100, launched 95-98: the GPU found it at 95 (it had been idle 5 ms), 3 ms late
        [(True, 4, 0.0, 40.0), (False, 4, 40.0, 45.0), (True, 2, 45.0, 85.0), (False, 6, 85.0, 90.0),
         (False, 6, 95.0, 100.0)],
        host=[(0.0, 30.0), (31.0, 33.0), (34.0, 60.0), (61.0, 62.0), (95.0, 98.0)])
    assert got["prefill"]["late_launches"] == 2 and got["prefill"]["late_launch_s"] == pytest.approx(0.045)
    assert got["decode"]["late_launches"] == 1 and got["decode"]["late_launch_s"] == pytest.approx(0.003)
    assert got["prefill"]["host_launch_s"] == pytest.approx(0.056)
    assert got["idle_by_transition"] == {"decode>decode": {"s": pytest.approx(0.005), "gaps": 1}}
    line = jobs.report_lines_gpu(got, None)[-2]
    assert line == ("  launches still running when the GPU reached their step: prefill 2 of 2 (0.04 s of host time "
                    "after it), decode 1 of 3 (0.00 s)")


def test_gpu_steps_count_the_allocators_calls_that_wait_for_the_gpu_during_the_job():
    """The caching allocator's counters over the job: the difference of memory_stats from GpuSteps' start to its
    summary, a key torch lacks counted as 0; the report prints them."""
    before = {"num_device_alloc": 40, "num_device_free": 2, "num_alloc_retries": 0, "num_sync_all_streams": 1,
              "allocated_bytes.all.current": 5}
    after = {"num_device_alloc": 47, "num_device_free": 6, "num_alloc_retries": 3, "num_sync_all_streams": 4}
    got = _replayed([(True, 4, 0.0, 10.0)], allocator=[before, after])
    assert got["allocator"] == {"num_device_alloc": 7, "num_device_free": 4, "num_alloc_retries": 3,
                                "num_sync_all_streams": 3}
    assert jobs.report_lines_gpu(got, None)[-1] == (
        "  the caching allocator during the job: 7 device allocations, 4 device frees, 3 retries, 3 syncs of all "
        "streams (each waits for the GPU)")
    assert _replayed([(True, 4, 0.0, 10.0)])["allocator"] == dict.fromkeys(jobs.ALLOCATOR_COUNTERS, 0)
