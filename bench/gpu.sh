#!/usr/bin/env bash
# Unattended GPU benchmark: the 124M preset in bf16 with torch.compile on every side; prints tok/s and
# MFU of the packtrain engine against the bare loops (transformers Llama, packtrain's fast Llama) and
# the nanoGPT-style reference GPT, with each side's peak device memory. Goal: >= 45% MFU on an H100.
#
#   bench/gpu.sh                       # on a CUDA machine (about 10 minutes, most of it compiling)
#   bench/gpu.sh --micro-batch 8       # extra flags go to bench/train_bench.py (the last one wins)
#   bench/gpu.sh --cpu-smoke           # the same Python path on CPU: 2 steps of the tiny preset
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"

if [[ "${1:-}" == "--cpu-smoke" ]]; then
    shift
    small="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')/email"
    exec "$PYTHON" bench/train_bench.py --device cpu --preset tiny --vocab 512 --seq-len 64 --micro-batch 2 \
        --steps 2 --reps 1 --precisions bf16 --force-bf16 --compile --memory-presets "" --no-resume --source "$small" "$@"
fi

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "bench/gpu.sh: no CUDA GPU is visible to torch on this machine, so there is nothing to measure." >&2
    echo "  (bench/gpu.sh --cpu-smoke runs the same Python path for 2 steps of a tiny model on CPU.)" >&2
    exit 2
fi

exec "$PYTHON" bench/train_bench.py --device cuda --preset 124M --vocab 32768 --seq-len 1024 --micro-batch 16 \
    --precisions bf16 --compile --steps 20 --reps 3 "$@"
