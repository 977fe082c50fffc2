#!/usr/bin/env bash
# The GPU checks in one bounded script, for a CUDA machine that has PyTorch but not our whole environment (no MLflow,
# Prefect or Great Expectations are needed: the sanitizer and the benchmark import none of them).
#
#   GRADPRUNE_FASHION_MNIST_DIR=/path/to/fashion-mnist OUT=/tmp/gpu bash benchmarks/gpu_check.sh [SECONDS]
#
# 1. the card, driver and versions -> $OUT/env.txt
# 2. the GPU tests (tests/test_gpu.py and the benchmark's CUDA test) -> $OUT/gpu-tests.log
# 3. a slice of the `gpu` benchmark preset (PreAct-ResNet18, 32x32 RGB) -> $OUT/compare-gpu.{csv,md,png}
# A compare-gpu.csv already in $OUT is resumed: its runs are skipped. Each step has its own time limit, so a slow
# card still brings back what finished (the CSV is appended per run).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
BUDGET=${1:-540}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PY:-python3}
DEFENSES=${GPU_DEFENSES:-none grad-prune-fast grad-prune-free fine-tuning fine-pruning neural-cleanse anp}
start=$SECONDS
left() { local l=$((BUDGET - (SECONDS - start))); echo $((l > 1 ? l : 1)); }  # timeout needs >= 1

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0))"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The tests: the CPU half of test_gpu.py runs on the conftest's two threads, as on the test machine.
timeout $(( $(left) / 3 )) $PY -m pytest -q -p no:cacheprovider \
  ${GPU_TESTS:-tests/test_gpu.py tests/test_benchmark.py::test_gpu_preset_on_cuda_names_the_card} 2>&1 \
  | tee "$OUT/gpu-tests.log"

# The benchmark slice: BadNets first, then Blend; seed 0; 100 trusted images per class; the attacker trains
# ${GPU_EPOCHS:-15} epochs on all 50,000 images. Rows that finish inside the limit are kept.
timeout $(( $(left) > 16 ? $(left) - 15 : 1 )) $PY benchmarks/compare.py --preset gpu --attacks ${GPU_ATTACKS:-badnets blend} --seeds 0 \
  --per-class 100 --train-epochs "${GPU_EPOCHS:-15}" \
  --defenses $DEFENSES --out "$OUT" --cache /tmp/gradprune-gpu-cache 2>&1 | tail -n 60 > "$OUT/compare.log"
cat "$OUT/compare.log"
# The table and plot from whatever rows finished (compare.py writes them only at its end).
$PY benchmarks/compare.py --preset gpu --report-only --out "$OUT" --defenses $DEFENSES > /dev/null 2>&1 || true
echo "gpu_check: done in $((SECONDS - start)) s"
