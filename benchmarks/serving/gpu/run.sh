#!/usr/bin/env bash
# The figures in this folder: the CUDA check, the serving benchmark, and the same benchmark with
# every upload decoded in the thread pool instead of on the event loop (which a GPU machine's cores
# may favour), on a machine with an NVIDIA GPU, onnxruntime-gpu and the service's packages
# importable, DEDE_DATA_DIR set. About 6 minutes on an H200.
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
benchmark() {
  "$python" -m benchmarks.serving.run --bundle "$bundle" --seconds 5 --warmup 1 \
    --batch-sizes 1,2,4,8,16,32,64,128,256,512 "$@"
}
benchmark --out "$out" --note "GPU machine; the load generator and the server share its CPU cores."
bench=$?
echo "benchmark exit $bench"
benchmark --out "$out/decode_in_threads" --server-setting inline_decode_max_pixels=0 \
  --note "GPU machine; every upload decoded in the thread pool (DEDE_INLINE_DECODE_MAX_PIXELS=0)."
threads=$?
echo "benchmark (decode in threads) exit $threads"
exit $((check || bench || threads))
