#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md: bench.py on SD 2.1-base's real UNet architecture (random weights, built
# from its config: no download, no internet) in fp16 and in bf16, on one CUDA GPU.
#
#   bash bench_gpu.sh                 # PYTHON=... to pick the interpreter; OUT=... where results go
#   VARIANTS=1 bash bench_gpu.sh      # also A/B the fp16 floor and SDS step: the default (CUDA graphs and channels_last),
#                                     # no CUDA graphs, a contiguous UNet, cuDNN benchmark mode
#   MEMORY=1 bash bench_gpu.sh        # also the VRAM table of README.md: bench.py --memory for sd15, sdxl and sd35m
#                                     # (random weights of each real architecture) in fp16 and bf16
#
# Budget on an H100: about 1 minute to build the 5 GB random-weight model (once, in $BENCH_CACHE), then about
# 1 minute per precision; VARIANTS=1 adds about 1 minute; MEMORY=1 builds three more models (sdxl 14 GB, sd35m
# 16 GB: about 1.5 minutes each on a 2-core CPU) and adds well under a minute per model and precision.
# Results: $OUT/gpu.txt (the card), $OUT/bench_sd21_<precision>.json (every figure) and .txt (log and table).
set -uo pipefail
cd "$(dirname "$0")"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-./bench_gpu_out}
CACHE=${BENCH_CACHE:-/tmp/bench-cache}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT" "$CACHE"

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PYTHON" -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"

status=0
for precision in fp16 bf16; do
  timeout 420 "$PYTHON" bench.py --model sd21 --device cuda --precision "$precision" --cache_dir "$CACHE" --json \
    > "$OUT/bench_sd21_$precision.json" 2> "$OUT/bench_sd21_$precision.txt"
  code=$?
  echo "== sd21 $precision: exit $code"
  grep -v "Loading\|Writing" "$OUT/bench_sd21_$precision.txt" | tail -17
  [ "$code" = 0 ] || status=1
done

if [ "${VARIANTS:-0}" = 1 ]; then
  timeout 420 "$PYTHON" bench.py --model sd21 --device cuda --precision fp16 --cache_dir "$CACHE" --steps 20 \
    --variants cuda_graphs,no_cuda_graphs,contiguous,cudnn_benchmark --json \
    > "$OUT/variants_sd21_fp16.json" 2> "$OUT/variants_sd21_fp16.txt"
  code=$?
  echo "== sd21 fp16 variants: exit $code"
  grep -v "Loading\|Writing" "$OUT/variants_sd21_fp16.txt" | tail -7
  [ "$code" = 0 ] || status=1
fi
if [ "${MEMORY:-0}" = 1 ]; then
  for model in sd15 sdxl sd35m; do
    for precision in fp16 bf16; do
      timeout 420 "$PYTHON" bench.py --model "$model" --device cuda --precision "$precision" --cache_dir "$CACHE" \
        --memory --json > "$OUT/memory_${model}_$precision.json" 2> "$OUT/memory_${model}_$precision.txt"
      code=$?
      echo "== $model $precision memory: exit $code"
      grep -v "Loading\|Writing" "$OUT/memory_${model}_$precision.txt" | tail -8
      [ "$code" = 0 ] || status=1
    done
  done
fi
exit $status
