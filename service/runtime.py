"""The ONNX Runtime session that scores batches: provider choice, checks against the manifest, warm-up.

Only the batcher's single inference thread calls `Detector.score`; nothing here is shared across
threads while a batch runs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort

from models.bundle import ONNX_INPUT, ONNX_SCORE, ExplainSpec, InputSpec

log = logging.getLogger("dede.runtime")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# cuDNN's exhaustive search (ONNX Runtime's default) times candidate kernels at load, so two
# processes serving one bundle can pick different kernels and give different low bits for the same
# image; the heuristic picks by shape alone, the same in every process.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


class RuntimeLoadError(Exception):
    """The graph cannot serve this bundle; the message says what does not match."""


_T = TypeVar("_T")


def lower_this_thread_priority(increment: int) -> None:
    """Raise the calling thread's nice value by `increment` (the thread's, not the process's: Linux
    keeps nice values per thread). Lowering one's own priority needs no privileges."""
    if increment > 0 and hasattr(os, "setpriority"):
        thread_id = threading.get_native_id()
        try:
            current = os.getpriority(os.PRIO_PROCESS, thread_id)
            os.setpriority(os.PRIO_PROCESS, thread_id, min(19, current + increment))
        except OSError as exc:
            log.warning("cannot lower the inference threads' priority: %s", exc)


def _in_lowered_thread(increment: int, make: Callable[[], _T]) -> _T:
    """make() in a fresh thread `increment` nice levels below the caller: the threads it starts
    (ONNX Runtime's intra-op pool) inherit that priority, while the caller keeps its own."""
    if increment <= 0:
        return make()
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            lower_this_thread_priority(increment)
            result.append(make())
        except BaseException as exc:  # handed back to the caller below
            error.append(exc)

    thread = threading.Thread(target=target, name="dede-session-load")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def _nvidia_device_visible() -> bool:
    # onnxruntime-gpu lists CUDA as available even on machines without a GPU, and asking for it
    # there fills the log with library-loading errors; look for the driver's device node first.
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def resolve_providers(requested: list[str]) -> list[str]:
    """'auto' -> CUDA then CPU when a GPU is visible, else CPU; explicit lists end with CPU."""
    available = ort.get_available_providers()
    if requested == ["auto"]:
        wanted = [CUDA, CPU] if CUDA in available and _nvidia_device_visible() else [CPU]
    else:
        missing = [p for p in requested if p not in available]
        if missing:
            log.warning("execution provider(s) %s not in this onnxruntime build %s", missing, available)
        wanted = [p for p in requested if p in available]
        if CPU not in wanted:
            wanted.append(CPU)
    if CUDA in wanted and hasattr(ort, "preload_dlls"):
        # Loads CUDA/cuDNN from the nvidia-* wheels when they are installed; harmless otherwise.
        ort.preload_dlls()
    return wanted


def batch_buckets(max_batch_size: int) -> list[int]:
    """Batch sizes to warm up: powers of two up to the maximum, and the maximum itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class Detector:
    """Scores uint8 [N, 3, H, W] batches with the bundle's graph."""

    def __init__(
        self,
        onnx_path: Path,
        spec: InputSpec,
        providers: list[str],
        intra_op_threads: int = 0,
        nice_increment: int = 0,
        cuda_options: dict[str, str] | None = None,
        explain: ExplainSpec | None = None,
    ) -> None:
        """cuda_options: the CUDA provider's options (default CUDA_OPTIONS).
        explain: the manifest's evidence outputs; None when the bundle has none (`explain` refuses).
        nice_increment > 0: every thread that computes scores (ONNX Runtime's pool and each
        caller of `score`) runs that many nice levels below the process, so that on a saturated CPU
        the event loop, which parses requests and answers refusals, is not starved by the model."""
        self._nice_increment = nice_increment
        self._lowered_threads: set[int] = set()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # Spinning threads between runs take CPU from the HTTP side; measured to matter on 2 cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options_by_provider = {CUDA: CUDA_OPTIONS if cuda_options is None else cuda_options}
        with_options = [(p, options_by_provider[p]) if p in options_by_provider else p for p in providers]
        try:
            self._session = _in_lowered_thread(
                nice_increment,
                lambda: ort.InferenceSession(str(onnx_path), sess_options=options, providers=with_options),
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise RuntimeLoadError(f"{onnx_path}: ONNX Runtime cannot load the graph: {exc}") from exc
        self.spec = spec
        self.explain_spec = explain
        self.providers = self._session.get_providers()
        self.provider = self.providers[0]
        self._check_signature()
        if CUDA in providers and self.provider != CUDA:
            log.warning("CUDA was requested but ONNX Runtime could not use it; running on %s", self.provider)
        # On a GPU, bind the input once per run and let ORT copy only the scores back to the host.
        self._use_io_binding = self.provider == CUDA
        # The batch size every batch is padded up to (CUDA only, set by warm_up).
        self._pad_to: int | None = None
        log.info("ONNX Runtime session on %s (providers %s)", self.provider, self.providers)

    def _check_signature(self) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if ONNX_INPUT not in inputs or len(inputs) != 1:
            raise RuntimeLoadError(f"the graph must have one input named '{ONNX_INPUT}', has {list(inputs)}")
        if ONNX_SCORE not in outputs:
            raise RuntimeLoadError(f"the graph has no output named '{ONNX_SCORE}' (has {list(outputs)})")
        graph_input = inputs[ONNX_INPUT]
        if graph_input.type != "tensor(uint8)":
            raise RuntimeLoadError(f"input '{ONNX_INPUT}' is {graph_input.type}, expected tensor(uint8)")
        expected = (3, self.spec.height, self.spec.width)
        shape = graph_input.shape
        fixed = tuple(shape[1:]) if len(shape) == 4 else None
        if fixed != expected:
            raise RuntimeLoadError(
                f"input '{ONNX_INPUT}' has shape {shape}; the manifest says [N, {', '.join(map(str, expected))}]"
            )
        if isinstance(shape[0], int) and shape[0] != 1:
            log.warning("input batch axis is fixed at %s; batches of other sizes will fail", shape[0])
        if self.explain_spec is not None:
            self._check_evidence_outputs(outputs)

    def _check_evidence_outputs(self, outputs: dict) -> None:
        assert self.explain_spec is not None
        spec = self.explain_spec
        expected = {
            spec.rebuild_output: ("tensor(uint8)", 4),
            spec.map_output: ("tensor(float)", 3),
        }
        for name, (dtype, rank) in expected.items():
            output = outputs.get(name)
            if output is None or output.type != dtype or len(output.shape) != rank:
                found = f"{output.type} {output.shape}" if output is not None else "no such output"
                raise RuntimeLoadError(
                    f"the manifest's explain entry names output '{name}' ({dtype}, rank {rank}); the graph "
                    f"has {found}: re-export the bundle"
                )

    @property
    def explains(self) -> bool:
        """Whether this graph gives evidence (rebuild, discrepancy map) besides the score."""
        return self.explain_spec is not None

    def explain(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 [N, 3, H, W] -> score float32 [N], rebuild uint8 [N, 3, H, W], map float32 [N, h, w]
        (the graph's raw map: divide by `explain_spec.map_scale` to normalise it)."""
        if self.explain_spec is None:
            raise RuntimeError("this bundle's graph has no evidence outputs")
        self._lower_priority()
        count = images.shape[0]
        if self._pad_to is not None and count < self._pad_to:
            # The one shape warmed up on CUDA (see warm_up); the extra outputs come back to the host.
            padding = np.zeros((self._pad_to - count, *images.shape[1:]), dtype=images.dtype)
            images = np.concatenate([images, padding])
        names = [ONNX_SCORE, self.explain_spec.rebuild_output, self.explain_spec.map_output]
        scores, rebuild, discrepancy = self._session.run(names, {ONNX_INPUT: images})
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if (
            scores.shape[0] != images.shape[0]
            or rebuild.shape != images.shape
            or len(discrepancy) != len(scores)
        ):
            raise RuntimeError(
                f"graph returned scores {scores.shape}, rebuild {rebuild.shape}, map {discrepancy.shape} "
                f"for images {images.shape}"
            )
        return scores[:count], rebuild[:count], np.asarray(discrepancy, dtype=np.float32)[:count]

    def _lower_priority(self) -> None:
        thread_id = threading.get_native_id()
        if self._nice_increment > 0 and thread_id not in self._lowered_threads:
            lower_this_thread_priority(self._nice_increment)
            self._lowered_threads.add(thread_id)

    def score(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 3, H, W] -> float32 [N]. Asks the graph for the score alone (see `explain`)."""
        self._lower_priority()
        count = images.shape[0]
        if self._pad_to is not None and count < self._pad_to:
            padding = np.zeros((self._pad_to - count, *images.shape[1:]), dtype=images.dtype)
            images = np.concatenate([images, padding])
        if self._use_io_binding:
            binding = self._session.io_binding()
            binding.bind_cpu_input(ONNX_INPUT, images)
            binding.bind_output(ONNX_SCORE, "cpu")
            self._session.run_with_iobinding(binding)
            scores = binding.copy_outputs_to_cpu()[0]
        else:
            scores = self._session.run([ONNX_SCORE], {ONNX_INPUT: images})[0]
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if scores.shape[0] != images.shape[0]:
            raise RuntimeError(f"graph returned {scores.shape[0]} scores for {images.shape[0]} images")
        return scores[:count]

    def warm_up(self, max_batch_size: int) -> dict[int, float]:
        """Run each batch shape this session will serve once (allocations, kernel choice); seconds
        per batch size. On CUDA that is one shape: every later batch is padded to `max_batch_size`."""
        # On an H200 each change of input shape between runs cost cuDNN about 34 ms (a batch of 4
        # takes 1.4 ms, one of 512 takes 3.7 ms), and scores moved with the shape by up to 1.6e-3
        # relative; with one shape they are identical at any batch size (benchmarks/serving/gpu/
        # README.md). On a CPU scores do not depend on the shape and padding only wastes compute.
        sizes = [max_batch_size] if self.provider == CUDA else batch_buckets(max_batch_size)
        timings = {}
        rng = np.random.default_rng(0)
        for size in sizes:
            batch = rng.integers(0, 256, size=(size, 3, self.spec.height, self.spec.width), dtype=np.uint8)
            start = time.perf_counter()
            self.score(batch)
            timings[size] = time.perf_counter() - start
        if self.provider == CUDA:
            self._pad_to = max_batch_size
        log.info("warm-up done for batch sizes %s in %.0f ms", sizes, 1000 * sum(timings.values()))
        return timings
