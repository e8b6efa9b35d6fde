#!/usr/bin/env bash
# On a machine with a CUDA GPU: the GPU tests and both benchmarks at 224 px, in about 8 minutes,
# one summary line each. Record the lines in docs/benchmarks.md with the card's name.
#
#   benchmarks/gpu_check.sh [image folder with train/<class>/ and test/<class>/]
#
# Default folder: data/01_raw/flowers, unpacked from ../shared/datasets/flowers-jpeg.tar.gz
# when that archive is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DATA=${1:-data/01_raw/flowers}
ARCHIVE=../shared/datasets/flowers-jpeg.tar.gz
export KEDRO_DISABLE_TELEMETRY=true

if [ ! -d "$DATA/train" ] && [ -f "$ARCHIVE" ]; then
  mkdir -p "$DATA" && tar -xzf "$ARCHIVE" -C "$DATA"
fi
test -d "$DATA/train" || { echo "no images at $DATA/train: pass an image folder" >&2; exit 2; }

echo "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"

tests=$(timeout 150 "$PYTHON" -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tail -1)
echo "gpu tests: $tests"

# Feature extraction from JPEG files (GPU decoding) beside the same card's compute-only bound.
extraction=$(timeout 200 "$PYTHON" benchmarks/feature_extraction.py --data "$DATA/train" \
  --image-size 224 --limit 2934 --device cuda --batch-size 256 --rounds 2 2>&1 | tail -1)
echo "feature extraction 224 px: $extraction"

# Fine-tuning throughput (AMP, channels_last) beside a bare forward+backward loop.
finetuning=$(timeout 200 "$PYTHON" benchmarks/fine_tuning.py --data "$DATA" --per-class 400 \
  --image-size 224 --epochs 2 --batch-size 64 --device cuda 2>&1 | tail -1)
echo "fine-tuning 224 px: $finetuning"
