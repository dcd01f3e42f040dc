#!/usr/bin/env bash
# The device check: GPU-marked tests, then CUDA timings of a few cells (every method's epoch against joint training).
# Usage on a machine with a GPU, from the repository root:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Prints the card, the test summary and the benchmark table; writes the JSON to OUT_DIR.
set -uo pipefail
out="${1:-${OUT:-.}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -20
MMBALANCE_BENCH_DEVICE=cuda MMBALANCE_BENCH_ROUNDS=3 pytest -q benchmarks -p no:cacheprovider \
  --benchmark-json="$out/bench_cuda.json" --benchmark-columns=min,median,max 2>&1 | tee "$out/bench.log" | tail -25
