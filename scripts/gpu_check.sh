#!/usr/bin/env bash
# All GPU checks in one call, from the repo root:  scripts/gpu_check.sh [SECTION ...]
#
# Sections (default: kernels):
#   kernel-tests   pytest -m gpu on the kernel tests (programmatic dependent launch included)
#   sanitize       compute-sanitizer memcheck of one small case of each kernel; racecheck of attention, skinny
#                  GEMM and sampling
#   kernel-bench   flashgen/bench/kernels.py (ceilings, peers, figures; kernels.json)
#   kernels        = kernel-tests sanitize kernel-bench
#   engine-tests   GPU parity of the engine with HF transformers (bf16, Qwen3-0.6B and Llama-3.1-8B shapes), then
#                  families
#   families       Phi partial-rotary RoPE, MoE (grouped GEMMs, fused routing) and FP8-weight GEMMs against their
#                  references; the engine on the CUDA backend against the torch backend for Phi-3, Qwen3-MoE,
#                  Mixtral and FP8 weights
#   throughput     flashgen/bench/throughput.py: nanovllm, fixed512 (vs HF), sharedprefix, latency8b
#   engine         = engine-tests throughput
#   all            = kernels engine
#   structured     structured outputs: the bitmask kernel tests, the CUDA-path engine test, and the structured
#                  workload (needs llguidance; TOKENIZER=DIR for the real BPE vocabulary, default the embedded
#                  model's)
#   sampling       logprobs, prompt logprobs and n: the GPU logprobs test and the logprobs, prompt_logprobs and
#                  samples workloads (each against the same work without the feature)
#   fp8            the 8-bit KV caches: their kernel tests, then nanovllm with a bf16, an fp8 and an int8k KV cache
#   trtllm         TensorRT-LLM's fixed-length workloads on the 8B shape, bf16 and then FP8 weights + FP8 KV, each next
#                  to its floor; TRTLLM="trtllm128 trtllm1000 trtllm5000" (the default) picks them: one or two fit a call
#   jobs           flashgen/bench/jobs.py: the extract, synth and summarize JSONL jobs through `flashgen generate`'s
#                  path, start-up included, next to their floor (a small job first fills the kernel cache;
#                  TOKENIZER=DIR as for structured, JOBS_SCALE=F shrinks the jobs, JOBS_LENGTHS=spread gives each
#                  line its own max_tokens as EOS would)
#   families-speed nanovllm's request mix on the Qwen3-30B-A3B (MoE) and Gemma-3-4B (sliding windows, head_dim 256)
#                  shapes, each next to its floor
#   multi          two GPUs: TP=2 parity with TP=1 (8B shape), latency8b at TP=1/2, nanovllm at DP=1/2
#   shared         shared-prefix decode's two kernels for the shared part: their GPU tests, the extract step's
#                  attention launch by launch (tools/probes/decode_extract_probe.py), then the sharedprefix
#                  workload and the extract job (scale JOBS_SCALE, default 0.2) with FLASHGEN_SHARED_KERNEL=decode
#                  and =prefill (the PF_SHARED kernel, the default), alternated in one call
#   admit          admission held for free slots (the default) against admitting at once (FLASHGEN_ADMIT_MIN_FREE=0),
#                  alternated, on the extract and synth jobs with lines of their own lengths (--lengths spread;
#                  JOBS_SCALE, default 0.2; TOKENIZER=DIR as for jobs)
#   gate           the launch gate on and off (FLASHGEN_LAUNCH_GATE=1|0), alternated twice on the extract job
#                  (JOBS_SCALE, default 0.3; TOKENIZER=DIR as for jobs)
#   host           the engine thread's host time: a decode step piece by piece on the extract shape and without
#                  the shared prefix (tools/probes/decode_launch_probe.py), and at 512 sequences with a preparation
#                  thread beside the engine, yielding the GIL or pausing at the launch gate; a prefill step's GEMMs
#                  by row count and decode-sized GEMMs against their floor (tools/probes/linear_host_probe.py);
#                  TOKENIZER=DIR as for jobs (default the embedded model's)
#   ab             nanovllm in the tree at $BASE (e.g. `git archive BASE_COMMIT | tar -x -C .base`) and in this
#                  one, alternated twice on the same GPU: a change's effect on speed, measured in one call
#   ab-jobs        the extract job (JOBS_SCALE, default 0.3) in the tree at $BASE and in this one, alternated twice,
#                  after a small job in each tree (its kernels compiled and a first job's graphs captured in both:
#                  a first job in a tree pays seconds of captures that are no measure of a change)
# Logs go to $OUT when it is set, else out/gpu_check/. Each section's status is printed at the end, then
# the benchmark's short table last. Exit status: non-zero if any section failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="${OUT:-out/gpu_check}"
mkdir -p "$LOG"
PY="${PYTHON:-python3}"
SANITIZER="${SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
declare -a SUMMARY=()
STATUS=0

step() {  # step NAME CMD...: run, tee the log, record the status
    local name=$1 rc start=$SECONDS
    shift
    echo "==== $name: $*"
    "$@" 2>&1 | tee "$LOG/$name.log"
    rc=${PIPESTATUS[0]}
    SUMMARY+=("$(printf '%-14s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
    [ "$rc" -eq 0 ] || STATUS=1
}

kernel_tests() {
    step kernel-tests "$PY" -m pytest -m gpu -x -q -p no:cacheprovider --durations=8 tests/test_kernels_gpu.py \
        tests/test_kv_fp8_gpu.py tests/test_kv_int8k_gpu.py tests/test_shared_prefix_gpu.py tests/test_window_gpu.py \
        tests/test_warp_auto_gpu.py tests/test_pdl.py
}

sanitize() {
    # Without torch's caching allocator every tensor is its own allocation: out-of-bounds accesses show.
    step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 9 \
        "$PY" scripts/sanitize_kernels.py
    step racecheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool racecheck --kernel-name kns=attention --error-exitcode 9 \
        "$PY" scripts/sanitize_kernels.py --attention
    local k
    for k in skinny_gemm gumbel_argmax; do  # the other kernels that share data through shared memory
        step "racecheck-$k" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool racecheck \
            --kernel-name "kns=$k" --error-exitcode 9 "$PY" scripts/sanitize_kernels.py
    done
}

kernel_bench() {
    step kernel-bench "$PY" -m flashgen.bench.kernels "$LOG"
    # the table is the tail of the log, after the last line of per-step progress
    "$PY" - "$LOG/kernel-bench.log" > "$LOG/kernel-table.txt" <<'EOF'
import sys
lines = open(sys.argv[1]).read().splitlines()
start = max((i for i, l in enumerate(lines) if l.startswith("device: ")), default=len(lines))
print("\n".join(lines[start:]))
EOF
}

engine_tests() {
    step engine-tests "$PY" -m pytest -m gpu -x -q -s -p no:cacheprovider tests/test_engine_gpu.py \
        tests/test_engine_step_no_wait_gpu.py tests/test_sampler.py tests/test_cli_gpu.py tests/test_job_faults.py
    families_tests
    step startup-1 "$PY" scripts/startup_check.py  # CuPy's kernel cache cold (fresh machine) ...
    step startup-2 "$PY" scripts/startup_check.py  # ... and warm
}

throughput() {
    local hf_tokens="${HF_MAX_TOKENS:-512}"
    step tp-nanovllm "$PY" -m flashgen.bench.throughput --workload nanovllm --out-dir "$LOG"
    step tp-fixed512 "$PY" -m flashgen.bench.throughput --workload fixed512 --compare hf \
        --hf-max-tokens "$hf_tokens" --out-dir "$LOG"
    step tp-sharedprefix "$PY" -m flashgen.bench.throughput --workload sharedprefix --out-dir "$LOG"
    step tp-latency8b "$PY" -m flashgen.bench.throughput --workload latency8b --out-dir "$LOG"
    { grep -h "start-up:" "$LOG"/startup-*.log; grep -h -A7 "^workload" "$LOG"/tp-*.log; } \
        > "$LOG/engine-table.txt" || true
}

families_tests() {
    step families-tests "$PY" -m pytest -m gpu -q -p no:cacheprovider --durations=5 tests/test_model_families_gpu.py \
        tests/test_fp8_weights_gpu.py tests/test_moe_grouped_gpu.py tests/test_moe_route_gpu.py
}

families_speed() {
    local w
    for w in moe30b gemma4b; do
        step "tp-$w" "$PY" -m flashgen.bench.throughput --workload "$w" --out-dir "$LOG"
        grep -h -A5 "^workload $w" "$LOG/tp-$w.log" >> "$LOG/engine-table.txt" || true
    done
}

structured() {
    step structured-tests "$PY" -m pytest -m gpu -x -q -p no:cacheprovider tests/test_kernels_gpu.py -k bitmask \
        tests/test_structured_gpu.py
    step tp-structured "$PY" -m flashgen.bench.throughput --workload structured \
        ${TOKENIZER:+--tokenizer "$TOKENIZER"} --out-dir "$LOG"
    grep -h -A3 "^workload structured" "$LOG"/tp-structured.log >> "$LOG/engine-table.txt" || true
}

sampling() {
    step sampling-tests "$PY" -m pytest -m gpu -x -q -p no:cacheprovider tests/test_logprobs_gpu.py
    local w
    for w in logprobs prompt_logprobs samples; do
        step "tp-$w" "$PY" -m flashgen.bench.throughput --workload "$w" --out-dir "$LOG"
        grep -h -A2 "^workload $w" "$LOG/tp-$w.log" >> "$LOG/engine-table.txt" || true
    done
}

fp8() {
    step fp8-tests "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_kv_fp8_gpu.py tests/test_kv_int8k_gpu.py
    step tp-nanovllm "$PY" -m flashgen.bench.throughput --workload nanovllm --out-dir "$LOG"
    step tp-nanovllm-fp8kv "$PY" -m flashgen.bench.throughput --workload nanovllm --kv-cache-dtype fp8 --out-dir "$LOG"
    step tp-nanovllm-int8kkv "$PY" -m flashgen.bench.throughput --workload nanovllm --kv-cache-dtype int8k \
        --out-dir "$LOG"
    grep -h -A5 "^workload nanovllm" "$LOG"/tp-nanovllm*.log >> "$LOG/engine-table.txt" || true
}

trtllm() {
    local w
    for w in ${TRTLLM:-trtllm128 trtllm1000 trtllm5000}; do
        # 128/128: as many sequences as the cache holds (TensorRT-LLM's figure uses a large batch too)
        local seqs=256
        [ "$w" = trtllm128 ] && seqs=1024
        step "tp-$w" "$PY" -m flashgen.bench.throughput --workload "$w" --max-num-seqs "$seqs" --out-dir "$LOG"
        step "tp-$w-fp8" "$PY" -m flashgen.bench.throughput --workload "$w" --max-num-seqs "$seqs" \
            --quantization fp8 --kv-cache-dtype fp8 --out-dir "$LOG"
        grep -h -A5 "^workload $w" "$LOG/tp-$w.log" "$LOG/tp-$w-fp8.log" >> "$LOG/engine-table.txt" || true
    done
}

bench_jobs() {
    local w scale="${JOBS_SCALE:-1}"
    # a fresh machine compiles the kernels on its first start (CuPy keeps them on disk): not part of the figures.
    # 600 lines, more than the 512 slots: full batches with their shared-prefix groups, whose first graph captures
    # (1.5-2.0 s inside the first extract job of a fresh machine at 0.005, 0.1-0.3 s after) are then behind us
    step jobs-warm "$PY" -m flashgen.bench.jobs --workload extract --scale 0.03 \
        ${TOKENIZER:+--tokenizer "$TOKENIZER"}
    for w in extract synth summarize; do
        step "jobs-$w" "$PY" -m flashgen.bench.jobs --workload "$w" --scale "$scale" \
            ${TOKENIZER:+--tokenizer "$TOKENIZER"} ${JOBS_LENGTHS:+--lengths "$JOBS_LENGTHS"} --out-dir "$LOG"
        grep -h -E "^workload $w|whole job|start-up [0-9]|on the GPU|idle by|host time|still running|caching allocator" \
            "$LOG/jobs-$w.log" >> "$LOG/engine-table.txt" || true
    done
}

multi() {
    step tp-parity "$PY" scripts/multi_gpu_check.py
    step tp-nanovllm-dp2 "$PY" -m flashgen.bench.throughput --workload nanovllm --data-parallel 2 --out-dir "$LOG"
    step tp-latency8b-tp2 "$PY" -m flashgen.bench.throughput --workload latency8b --tensor-parallel-size 2 \
        --out-dir "$LOG"
    step tp-latency8b "$PY" -m flashgen.bench.throughput --workload latency8b --out-dir "$LOG"
    step tp-nanovllm "$PY" -m flashgen.bench.throughput --workload nanovllm --out-dir "$LOG"
    { grep -h "TP=2 vs" "$LOG"/tp-parity.log; grep -h -A7 "^workload" "$LOG"/tp-*.log; } \
        > "$LOG/engine-table.txt" || true
}

shared() {
    step shared-tests "$PY" -m pytest -m gpu -x -q -p no:cacheprovider tests/test_shared_prefix_gpu.py
    step shared-probe "$PY" tools/probes/decode_extract_probe.py  # the extract step's attention, launch by launch
    local k
    for k in decode prefill; do
        mkdir -p "$LOG/$k"
        step "tp-sharedprefix-$k" env FLASHGEN_SHARED_KERNEL=$k "$PY" -m flashgen.bench.throughput \
            --workload sharedprefix --out-dir "$LOG/$k"
        step "jobs-extract-$k" env FLASHGEN_SHARED_KERNEL=$k "$PY" -m flashgen.bench.jobs --workload extract \
            --scale "${JOBS_SCALE:-0.2}" ${TOKENIZER:+--tokenizer "$TOKENIZER"} --out-dir "$LOG/$k"
    done
    for k in decode prefill; do
        { echo "FLASHGEN_SHARED_KERNEL=$k"; grep -h -A3 "^workload" "$LOG/tp-sharedprefix-$k.log" \
            "$LOG/jobs-extract-$k.log"; } >> "$LOG/engine-table.txt" || true
    done
}

admit() {
    local w n
    for w in extract synth; do
        for n in default 0; do
            local set=()
            [ "$n" = 0 ] && set=(FLASHGEN_ADMIT_MIN_FREE=0)
            step "admit-$w-$n" env ${set[@]+"${set[@]}"} "$PY" -m flashgen.bench.jobs --workload "$w" \
                --scale "${JOBS_SCALE:-0.2}" --lengths spread ${TOKENIZER:+--tokenizer "$TOKENIZER"}
            { echo "admission $n:"; grep -h -A4 "^workload" "$LOG/admit-$w-$n.log" | grep "whole job\|start-up"; } \
                >> "$LOG/engine-table.txt" || true
        done
    done
}

gate() {
    # the launch gate (flashgen/engine/launch_gate.py) on and off, alternated, after a warm-up job
    step gate-warm "$PY" -m flashgen.bench.jobs --workload extract --scale 0.03 ${TOKENIZER:+--tokenizer "$TOKENIZER"}
    local i g
    for i in 1 2; do
        for g in 1 0; do
            step "gate-extract-$g-$i" env FLASHGEN_LAUNCH_GATE=$g "$PY" -m flashgen.bench.jobs --workload extract \
                --scale "${JOBS_SCALE:-0.3}" ${TOKENIZER:+--tokenizer "$TOKENIZER"}
            { echo "launch gate $g, run $i:"; grep -h "whole job\|host time inside\|on the GPU" \
                "$LOG/gate-extract-$g-$i.log"; } >> "$LOG/engine-table.txt" || true
        done
    done
}

host() {
    local tok="${TOKENIZER:-$("$PY" -c 'from flashgen.models.default_model import DEFAULT_MODEL, resolve_model
print(resolve_model(DEFAULT_MODEL))')}"
    step host-decode "$PY" tools/probes/decode_launch_probe.py --tokenizer "$tok"
    step host-decode-plain "$PY" tools/probes/decode_launch_probe.py --tokenizer "$tok" --no-shared
    local b
    for b in busy gated; do  # 512 sequences (the default slots) with a preparation thread beside the engine
        step "host-decode-512-$b" "$PY" tools/probes/decode_launch_probe.py --tokenizer "$tok" --seqs 512 --beside "$b"
    done
    step host-linear "$PY" tools/probes/linear_host_probe.py
    { grep -h -A20 "^piece" "$LOG/host-decode.log" "$LOG/host-decode-plain.log" "$LOG"/host-decode-512-*.log
      grep -h -A8 "^     M" \
        "$LOG/host-linear.log"; } >> "$LOG/engine-table.txt" || true
}

ab() {
    local base="${BASE:?ab needs BASE=DIR, a copy of the tree to compare with}" i
    for i in 1 2; do
        # from inside BASE: `python -m` puts the current directory ahead of PYTHONPATH
        step "ab-base-$i" env -C "$base" PYTHONPATH=. "$PY" -m flashgen.bench.throughput --workload nanovllm
        step "ab-this-$i" "$PY" -m flashgen.bench.throughput --workload nanovllm
    done
    grep -H "output tok/s" "$LOG"/ab-*.log > "$LOG/engine-table.txt" || true
}

ab_jobs() {
    local base="${BASE:?ab-jobs needs BASE=DIR, a copy of the tree to compare with}" i
    local tok="${TOKENIZER:+$(realpath "$TOKENIZER")}"  # the base runs from inside BASE
    local job=(-m flashgen.bench.jobs --workload extract ${tok:+--tokenizer "$tok"})
    step ab-jobs-warm-base env -C "$base" PYTHONPATH=. "$PY" "${job[@]}" --scale 0.03
    step ab-jobs-warm-this "$PY" "${job[@]}" --scale 0.03
    for i in 1 2; do
        step "ab-jobs-base-$i" env -C "$base" PYTHONPATH=. "$PY" "${job[@]}" --scale "${JOBS_SCALE:-0.3}"
        step "ab-jobs-this-$i" "$PY" "${job[@]}" --scale "${JOBS_SCALE:-0.3}"
    done
    grep -H "whole job\|host time inside\|on the GPU" "$LOG"/ab-jobs-base-*.log "$LOG"/ab-jobs-this-*.log \
        >> "$LOG/engine-table.txt" || true
}

[ $# -eq 0 ] && set -- kernels
for section in "$@"; do
    case "$section" in
        kernels) kernel_tests; sanitize; kernel_bench ;;
        kernel-tests) kernel_tests ;;
        sanitize) sanitize ;;
        kernel-bench) kernel_bench ;;
        engine-tests) engine_tests ;;
        throughput) throughput ;;
        engine) engine_tests; throughput ;;
        all) kernel_tests; sanitize; kernel_bench; engine_tests; throughput ;;
        structured) structured ;;
        shared) shared ;;
        sampling) sampling ;;
        fp8) fp8 ;;
        trtllm) trtllm ;;
        jobs) bench_jobs ;;
        families) families_tests ;;
        families-speed) families_speed ;;
        multi) multi ;;
        admit) admit ;;
        gate) gate ;;
        host) host ;;
        ab) ab ;;
        ab-jobs) ab_jobs ;;
        *) echo "gpu_check.sh: unknown section '$section' (kernels, kernel-tests, sanitize, kernel-bench, engine-tests, throughput, engine, all, families, structured, shared, sampling, fp8, trtllm, jobs, multi, admit, gate, host, ab, ab-jobs)" >&2; exit 2 ;;
    esac
done

echo "==== summary (logs in $LOG)"
printf '%s\n' "${SUMMARY[@]}"
[ -s "$LOG/kernel-table.txt" ] && cat "$LOG/kernel-table.txt"
[ -s "$LOG/engine-table.txt" ] && cat "$LOG/engine-table.txt"
exit $STATUS
