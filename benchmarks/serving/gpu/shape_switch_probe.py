"""Per-call time of the CUDA session when consecutive batches change shape, and what removes the cost."""

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from models.bundle import load_bundle
from service.runtime import CPU, CUDA, CUDA_OPTIONS, Detector, batch_buckets

bundle = load_bundle(Path(sys.argv[1]))
spec = bundle.manifest.input
buckets = batch_buckets(512)
rng = np.random.default_rng(0)
pool = rng.integers(0, 256, size=(512, 3, spec.height, spec.width), dtype=np.uint8)
CYCLE = [3, 5, 2, 8, 4, 7, 1, 6, 16, 30]
N = 30


def timed(fn, sizes):
    out = []
    for i in range(N):
        b = pool[: sizes[i % len(sizes)]]
        t = time.perf_counter()
        fn(b)
        out.append(1e3 * (time.perf_counter() - t))
    return {"median_ms": round(statistics.median(out), 3), "max_ms": round(max(out), 3)}


def detector(nice=0, opts=None):
    d = Detector(bundle.onnx_path, spec, [CUDA, CPU], nice_increment=nice, cuda_options=opts)
    d.warm_up(buckets)
    return d


res = {}
d = detector()
res["fixed_4"] = timed(d.score, [4])
res["fixed_8"] = timed(d.score, [8])
res["cycling_buckets"] = timed(d.score, CYCLE)
d._pad_buckets = [512]
res["cycling_pad_to_512"] = timed(d.score, CYCLE)
res["fixed_512"] = timed(d.score, [512])
d._pad_buckets = [32, 512]
res["cycling_pad_to_32"] = timed(d.score, CYCLE)
print(json.dumps(res), flush=True)
d = detector(nice=5)
res["nice5_cycling_buckets"] = timed(d.score, CYCLE)
print(json.dumps(res), flush=True)
d = detector(opts={"cudnn_conv_algo_search": "EXHAUSTIVE"})
res["exhaustive_cycling_buckets"] = timed(d.score, CYCLE)
print(json.dumps(res), flush=True)
so = ort.SessionOptions()
s = ort.InferenceSession(str(bundle.onnx_path), so, providers=[(CUDA, CUDA_OPTIONS), CPU])
for b in buckets:
    s.run(None, {"images": pool[:b]})
res["plain_run_cycling_buckets"] = timed(
    lambda x: s.run(
        None,
        {
            "images": np.concatenate(
                [x, np.zeros((next(b for b in buckets if b >= len(x)) - len(x), *x.shape[1:]), np.uint8)]
            )
        },
    ),
    CYCLE,
)
res["plain_run_fixed_4"] = timed(lambda x: s.run(None, {"images": x}), [4])
print(json.dumps(res, indent=1), flush=True)
