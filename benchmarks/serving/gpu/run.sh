#!/usr/bin/env bash
# The figures in this folder: the CUDA check, then the serving benchmark, on a machine with an
# NVIDIA GPU, onnxruntime-gpu and the service's packages importable, DEDE_DATA_DIR set. About 4
# minutes on an H200.
#
#     bash benchmarks/serving/gpu/run.sh bundles/demo benchmarks/serving/gpu
set -uo pipefail
bundle=${1:-bundles/demo}
out=${2:-benchmarks/serving/gpu}
python=${PYTHON:-python3}
mkdir -p "$out"
"$python" -m benchmarks.serving.cuda_check --bundle "$bundle" --out "$out" --max-batch-size 512 \
  >"$out/cuda_check.log" 2>&1
check=$?
echo "cuda_check exit $check"
tail -n 40 "$out/cuda_check.log"
"$python" -m benchmarks.serving.run --bundle "$bundle" --out "$out" --seconds 5 --warmup 1 \
  --batch-sizes 1,2,4,8,16,32,64,128,256,512 \
  --note "GPU machine; the load generator and the server share its CPU cores."
bench=$?
echo "benchmark exit $bench"
# Issue 23: serving processes on the one GPU, 1 to 16 (each its own CUDA session), same run. One
# round: a lent GPU's time is short (the CPU runs take three and read medians).
"$python" -m benchmarks.serving.workers --bundle "$bundle" --out "$out/workers" --workers 1,4,8,16 \
  --images-per-request 8 --concurrency 64,256 --max-batch-size 512 --seconds 5 --warmup 1 --rounds 1 \
  --note "GPU machine; the load generator (one Python process) shares the CPU cores with the server."
workers=$?
echo "workers exit $workers"
exit $((check || bench || workers))
