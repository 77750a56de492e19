"""Dynamic batching: many requests' images -> one model run, each image's score back to its request.

Policy (after Triton's dynamic batcher):
  - one queue of images, bounded by `max_queue`; a submit that does not fit fails at once
    (`QueueFull`, the API's 503), it never waits. A request reserves room for its images as soon as
    it knows how many it has (`reserve`, before decoding them), so under a flood the excess is
    refused before any work is spent on it, and a request that got room is never refused late;
  - a batch is up to `max_batch_size` images; it waits for more at most `max_delay_s` after its
    oldest image arrived, and only while more work is known to be on its way (requests counted by
    `incoming()` from their body read to submit, unless they wait for a decode worker process, which
    takes longer than any batch should wait): a lone request runs at once;
  - one inference thread owns the model; futures are created and completed on the event loop only;
  - an exception in a batch reaches every request of that batch and the worker goes on;
  - images whose request went away (future cancelled) are dropped before the run;
  - on stop, queued images are still run; anything left when the worker ends is failed, so no
    future is ever left hanging;
  - an image submitted with `explain=True` gets its evidence (rebuild, discrepancy map) too: a batch
    holding one such image runs `run_explained` instead of `run_batch`, and only those images keep
    the evidence (a batch without one costs what it did before).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.metrics import Metrics

log = logging.getLogger("dede.batcher")


class QueueFull(Exception):
    """The queue cannot take these images now; try again shortly."""


class BatcherClosed(Exception):
    """The batcher is stopping or stopped and takes no more work."""


class InferenceFailed(Exception):
    """The model run of the batch holding this image raised an error."""


@dataclass(frozen=True)
class Evidence:
    """What the graph saw in one image, besides its score."""

    rebuild: np.ndarray  # uint8 [3, H, W]
    discrepancy_map: np.ndarray  # float32 [h, w], as the graph gives it (not normalised)


@dataclass(frozen=True)
class ScoredImage:
    score: float
    queue_s: float  # from submit to the start of its batch's run
    compute_s: float  # its batch's model run
    batch_size: int
    evidence: Evidence | None = None  # only for images submitted with explain=True


# uint8 [N, 3, H, W] -> (scores [N], rebuilds uint8 [N, 3, H, W], maps [N, h, w])
ExplainedRun = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(eq=False)
class _Pending:
    image: np.ndarray
    future: asyncio.Future[ScoredImage]
    enqueued_at: float
    explain: bool = False


class Reservation:
    """Room in a queue held for one request's images (see `ReservingQueue.reserve`)."""

    def __init__(self, queue: ReservingQueue, count: int) -> None:
        self._queue = queue
        self.count = count

    def release(self) -> None:
        self._queue._reserved -= self.count
        self.count = 0

    def submit(
        self, images: Sequence[np.ndarray], explain: bool = False
    ) -> list[asyncio.Future[ScoredImage]]:
        """Queue these images (at most the reserved count) in the room held for them."""
        if len(images) > self.count:
            raise ValueError(f"{len(images)} images submitted on a reservation of {self.count}")
        self.release()  # the room is handed to the submit below, on the same loop step
        if explain:
            return self._queue.submit(images, explain=True)
        return self._queue.submit(images)


class ReservingQueue:
    """Admission shared by every queue the API submits to (this module's `Batcher`, and the Ray
    replica's queue in deploy/ray_app.py): room is reserved before decoding, submitted after."""

    _max_queue: int  # images queued or reserved, at most
    _reserved: int = 0  # images held for requests between `reserve` and their submit

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    @property
    def queue_depth(self) -> int:
        raise NotImplementedError

    @property
    def explains(self) -> bool:
        """Whether `submit(..., explain=True)` is taken (the graph gives evidence)."""
        return False

    def submit(self, images: Sequence[np.ndarray]) -> list[asyncio.Future[ScoredImage]]:
        raise NotImplementedError

    def has_room(self, count: int = 1) -> bool:
        return self.queue_depth + self._reserved + count <= self._max_queue

    @contextlib.contextmanager
    def reserve(self, count: int) -> Iterator[Reservation]:
        """Room for `count` images, held until they are submitted through the reservation (or the
        block ends); raises `QueueFull` or `BatcherClosed` at once when it cannot be had."""
        if self.closed:
            raise BatcherClosed("the service is shutting down")
        if not self.has_room(count):
            raise QueueFull(
                f"{self.queue_depth} images queued and {self._reserved} on their way (limit {self._max_queue})"
            )
        reservation = Reservation(self, count)
        self._reserved += count
        try:
            yield reservation
        finally:
            reservation.release()


class Batcher(ReservingQueue):
    """Collects images from many requests into batches for `run_batch` (uint8 [N,3,H,W] -> [N])."""

    def __init__(
        self,
        run_batch: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        metrics: Metrics | None = None,
        run_explained: ExplainedRun | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._run_explained = run_explained
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_queue = max_queue
        self._metrics = metrics
        self._queue: deque[_Pending] = deque()
        self._running: list[_Pending] = []
        self._incoming = 0
        self._reserved = 0
        self._closing = False
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dede-inference")
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="dede-batcher")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Refuse new work, run what is queued (for at most `timeout_s`), then end the worker."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout_s)
            except TimeoutError:
                log.error("batcher did not drain within %.1f s; failing the images still queued", timeout_s)
                self._worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def explains(self) -> bool:
        return self._run_explained is not None

    # -- intake ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Mark a request as on its way (reading, decoding) so a filling batch waits for it."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1
            self._wakeup.set()  # a batch waiting for this request must not wait in vain

    def submit(
        self, images: Sequence[np.ndarray], explain: bool = False
    ) -> list[asyncio.Future[ScoredImage]]:
        """Queue the images of one request (all or none); one future per image, in order.
        explain=True: each result carries its `Evidence` (needs `run_explained`)."""
        if explain and self._run_explained is None:
            raise ValueError("explain=True needs a Batcher made with run_explained")
        if self._closing:
            raise BatcherClosed("the service is shutting down")
        if not self.has_room(len(images)):
            raise QueueFull(f"{len(self._queue)} images already queued (limit {self._max_queue})")
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        pending = [_Pending(image, loop.create_future(), now, explain) for image in images]
        self._queue.extend(pending)
        self._set_depth()
        self._wakeup.set()
        return [p.future for p in pending]

    # -- worker ------------------------------------------------------------------------------

    async def _work(self) -> None:
        try:
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    await self._wait_for_wakeup(None)
                    continue
                await self._let_batch_fill()
                batch = self._take_batch()
                try:
                    if batch:
                        await self._run(batch)
                except Exception as exc:  # a bug here must not stop the worker nor strand a request
                    log.exception("batcher error on a batch of %d images", len(batch))
                    _fail(batch, InferenceFailed(f"internal batching error: {exc}"))
        finally:
            self._fail_leftovers()

    async def _wait_for_wakeup(self, timeout_s: float | None) -> None:
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout_s)

    async def _let_batch_fill(self) -> None:
        deadline = self._queue[0].enqueued_at + self._max_delay_s
        while len(self._queue) < self._max_batch_size and self._incoming > 0 and not self._closing:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            await self._wait_for_wakeup(remaining)

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        while self._queue and len(batch) < self._max_batch_size:
            item = self._queue.popleft()
            if not item.future.done():  # its request was cancelled: do not spend compute on it
                batch.append(item)
        self._set_depth()
        return batch

    async def _run(self, batch: list[_Pending]) -> None:
        assert self._executor is not None, "Batcher.start() was not called"
        loop = asyncio.get_running_loop()
        # Kept until the run ends, so that a cancelled worker still fails these futures.
        self._running = batch
        started = time.perf_counter()
        try:
            scores, evidence = await loop.run_in_executor(self._executor, self._stack_and_score, batch)
        except Exception as exc:
            self._running = []
            log.exception("inference failed for a batch of %d images", len(batch))
            if self._metrics is not None:
                self._metrics.inference_failures.inc()
            _fail(batch, InferenceFailed(f"the model failed on a batch of {len(batch)} images: {exc}"))
            return
        self._running = []
        compute_s = time.perf_counter() - started
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(batch))
            self._metrics.batch_compute.observe(compute_s)
        for index, (item, score) in enumerate(zip(batch, scores, strict=True)):
            queue_s = started - item.enqueued_at
            if self._metrics is not None:
                self._metrics.queue_wait.observe(queue_s)
            if not item.future.done():
                shown = evidence[index] if evidence is not None and item.explain else None
                item.future.set_result(ScoredImage(float(score), queue_s, compute_s, len(batch), shown))

    def _stack_and_score(self, batch: list[_Pending]) -> tuple[np.ndarray, list[Evidence] | None]:
        # Runs on the inference thread so that copying a large batch does not block the event loop.
        images = np.stack([p.image for p in batch])
        evidence = None
        if self._run_explained is not None and any(p.explain for p in batch):
            raw_scores, rebuilds, maps = self._run_explained(images)
            evidence = [Evidence(r, m) for r, m in zip(rebuilds, maps, strict=True)]
        else:
            raw_scores = self._run_batch(images)
        scores = np.asarray(raw_scores)
        if scores.shape != (len(images),):
            raise RuntimeError(f"the model returned scores of shape {scores.shape} for {len(images)} images")
        return scores, evidence

    def _fail_leftovers(self) -> None:
        leftovers = [*self._running, *self._queue]
        self._queue.clear()
        self._running = []
        self._set_depth()
        _fail(leftovers, BatcherClosed("the service stopped before this image was scored"))

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.set(len(self._queue))


def _fail(items: list[_Pending], error: Exception) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)
