#!/usr/bin/env bash
# The device check (issue 12), one script that finishes in at most 10 minutes on one GPU:
#   1. the GPU-marked tests (pytest -m gpu), at most GPU_CHECK_TEST_S seconds (default 280);
#   2. benchmarks/gpu_epoch.py: the training-epoch time of joint training (concat + unimodal CE)
#      and of IPRM with two ResNet-18 at the CREMA-D shapes (two 224x224 frames, a 257x1250
#      spectrogram, batch 64, bf16) from random tensors, from the input cache and from files
#      generated at real sizes; writes OUT_DIR/gpu_epoch.json (device name, s/epoch, ratios,
#      peak memory, samples/s of the input path), at most GPU_CHECK_EPOCH_S seconds (200);
#   3. benchmarks/bench_input.py: batches/s of the input path, cache against files (~200
#      clips), at most GPU_CHECK_INPUT_S seconds (90).
# Every method's epoch against joint training (benchmarks/bench_methods.py and bench_epoch.py)
# takes longer; GPU_CHECK_METHODS=1 adds it after the rest.
# Usage, from the repository root on a machine with a GPU:
#   bash benchmarks/gpu_check.sh [OUT_DIR]                  # OUT_DIR defaults to $OUT, else .
#   GPU_CHECK_STEPS=30 bash benchmarks/gpu_check.sh out     # more timed batches per figure
# It also runs without a GPU (the tests are skipped, the figures come from a tiny CPU run):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_STEPS=2 bash benchmarks/gpu_check.sh /tmp/check
set -uo pipefail
out="${1:-${OUT:-.}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
device="${GPU_CHECK_DEVICE:-auto}"
steps="${GPU_CHECK_STEPS:-20}"
status=0
start=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"

echo "== 1. GPU-marked tests"
timeout "${GPU_CHECK_TEST_S:-280}" python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -20
rc=${PIPESTATUS[0]}
[ "$rc" -eq 124 ] && echo "GPU tests stopped at ${GPU_CHECK_TEST_S:-280} s"
[ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && status=1   # 5: nothing collected (no GPU tests ran)

echo "== 2. epoch time: joint training and IPRM, random tensors / cache / files"
timeout "${GPU_CHECK_EPOCH_S:-200}" python benchmarks/gpu_epoch.py --device "$device" --steps "$steps" \
  --out "$out/gpu_epoch.json" 2>&1 | tee "$out/gpu_epoch.log" | grep -v '^ ' | tail -25
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && { echo "gpu_epoch.py failed or timed out (exit $rc)"; status=1; }

echo "== 3. input path: batches/s from the cache against from files"
MMBALANCE_BENCH_DEVICE="$device" timeout "${GPU_CHECK_INPUT_S:-90}" python -m pytest -q benchmarks/bench_input.py \
  -p no:cacheprovider -s --benchmark-json="$out/bench_input.json" --benchmark-columns=min,median 2>&1 \
  | tee "$out/bench_input.log" | grep -E "bench_input|passed|failed|error" | tail -8
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && { echo "bench_input failed or timed out (exit $rc)"; status=1; }

if [ "${GPU_CHECK_METHODS:-0}" = "1" ]; then
  echo "== 4. every method's epoch against joint training (longer)"
  MMBALANCE_BENCH_DEVICE=cuda MMBALANCE_BENCH_ROUNDS=3 python -m pytest -q benchmarks/bench_methods.py benchmarks/bench_epoch.py \
    -p no:cacheprovider --benchmark-json="$out/bench_cuda.json" --benchmark-columns=min,median,max 2>&1 \
    | tee "$out/bench.log" | tail -25
fi

python - "$out/gpu_epoch.json" <<'EOF' || true
import json, sys
f = json.load(open(sys.argv[1]))
print(f"device {f['device']}  batch {f['batch_size']}  {f['shapes']} shapes  ({f['epoch']['batches']} batches/epoch)")
for m, r in f["methods"].items():
    print(f"  {r['label']:>16}: " + "  ".join(f"{p} {r[p]['s_per_epoch']:.2f} s/epoch" for p in ("random", "cache", "files") if p in r))
if "input" in f:
    i = f["input"]
    print(f"  input path: cache {i['cache']['samples_per_s']:.0f} samples/s, files {i['files']['samples_per_s']:.0f} samples/s")
if "goal" in f:
    print(f"  goal: IPRM epoch <= {f['goal']['iprm_epoch_s_at_most']} s from the cache: {f['goal']['iprm_cache_epoch_s']:.2f} s, met: {f['goal']['met']}")
EOF
echo "gpu_check finished in $(( $(date +%s) - start )) s; figures in $out (exit $status)"
exit $status
