"""The batcher's policy, each rule on its own, with a fake model in place of ONNX Runtime."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batcher import Batcher, BatcherClosed, InferenceFailed, QueueFull
from service.metrics import Metrics


def image(value: int) -> np.ndarray:
    return np.full((3, 2, 2), value, dtype=np.uint8)


class FakeModel:
    """score = the image's first pixel; records batch sizes; can be held or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.release.set()
        self.started = threading.Event()
        self.fail_when: int | None = None  # raise when this pixel value is in the batch

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        values = [int(v) for v in batch[:, 0, 0, 0]]
        self.batches.append(values)
        self.started.set()
        self.release.wait(10)
        if self.fail_when is not None and self.fail_when in values:
            raise ValueError("model exploded")
        return batch[:, 0, 0, 0].astype(np.float32)


def make_batcher(model: FakeModel, **kwargs: object) -> Batcher:
    options = {"max_batch_size": 4, "max_delay_s": 0.05, "max_queue": 100, "metrics": Metrics(4, 1.0)}
    options.update(kwargs)
    return Batcher(model, **options)


async def wait_started(model: FakeModel) -> None:
    await asyncio.to_thread(model.started.wait, 5)


def test_lone_request_runs_at_once_despite_a_long_max_delay() -> None:
    async def scenario() -> float:
        batcher = make_batcher(FakeModel(), max_delay_s=5.0)
        batcher.start()
        started = time.perf_counter()
        (future,) = batcher.submit([image(7)])
        result = await asyncio.wait_for(future, 2)
        await batcher.stop()
        assert result.score == 7.0 and result.batch_size == 1
        return time.perf_counter() - started

    assert asyncio.run(scenario()) < 0.5


def test_images_queued_during_a_run_form_the_next_batch_up_to_max_batch_size() -> None:
    model = FakeModel()

    async def scenario() -> None:
        batcher = make_batcher(model, max_batch_size=4)
        batcher.start()
        model.release.clear()
        first = batcher.submit([image(1)])
        await wait_started(model)  # the model now holds image 1; the next six wait in the queue
        rest = [batcher.submit([image(v)])[0] for v in range(2, 8)]
        assert batcher.queue_depth == 6
        model.release.set()
        results = await asyncio.gather(*first, *rest)
        assert [r.score for r in results] == [1, 2, 3, 4, 5, 6, 7]
        await batcher.stop()

    asyncio.run(scenario())
    assert model.batches == [[1], [2, 3, 4, 5], [6, 7]]


def test_a_filling_batch_waits_for_an_incoming_request_but_at_most_max_delay() -> None:
    model = FakeModel()

    async def scenario() -> tuple[float, float]:
        batcher = make_batcher(model, max_delay_s=0.2)
        batcher.start()
        # One request arrives while another is still being read: the batch waits for it...
        with batcher.incoming():
            started = time.perf_counter()
            (early,) = batcher.submit([image(1)])
            await asyncio.sleep(0.05)
            (late,) = batcher.submit([image(2)])
        await asyncio.gather(early, late)
        together = model.batches[-1]
        # ...but a request that never comes only delays the batch by max_delay.
        with batcher.incoming():
            waited_from = time.perf_counter()
            (alone,) = batcher.submit([image(3)])
            await alone
            waited = time.perf_counter() - waited_from
        await batcher.stop()
        assert together == [1, 2]
        return waited, time.perf_counter() - started

    waited, _ = asyncio.run(scenario())
    assert 0.15 <= waited < 1.0


def test_a_full_queue_refuses_at_once_and_all_or_nothing() -> None:
    model = FakeModel()

    async def scenario() -> None:
        batcher = make_batcher(model, max_queue=3)
        batcher.start()
        model.release.clear()
        running = batcher.submit([image(1)])
        await wait_started(model)
        queued = batcher.submit([image(2), image(3)])
        started = time.perf_counter()
        with pytest.raises(QueueFull):
            batcher.submit([image(4), image(5)])  # 2 + 2 > 3: none of the two is queued
        assert time.perf_counter() - started < 0.01
        assert batcher.queue_depth == 2
        assert batcher.has_room(1) and not batcher.has_room(2)
        model.release.set()
        assert [r.score for r in await asyncio.gather(*running, *queued)] == [1, 2, 3]
        await batcher.stop()

    asyncio.run(scenario())


def test_reserved_room_is_kept_for_its_request_and_refuses_others_before_they_decode() -> None:
    model = FakeModel()

    async def scenario() -> None:
        batcher = make_batcher(model, max_queue=4)
        batcher.start()
        model.release.clear()
        running = batcher.submit([image(1)])
        await wait_started(model)
        with batcher.reserve(3) as first:  # e.g. a request of 3 images, about to decode them
            assert not batcher.has_room(2)
            with pytest.raises(QueueFull), batcher.reserve(2):
                pass
            late = batcher.submit([image(9)])  # room that nobody reserved is still taken
            with pytest.raises(QueueFull):
                batcher.submit([image(8)])  # the 3 reserved places are not given away
            with pytest.raises(ValueError):
                first.submit([image(2)] * 4)
            kept = first.submit([image(2), image(3)])  # fewer than reserved: one image failed to decode
        assert batcher.queue_depth == 3 and batcher.has_room(1) and not batcher.has_room(2)
        with pytest.raises(RuntimeError), batcher.reserve(1):
            raise RuntimeError("decoding crashed")
        assert batcher.has_room(1)  # a reservation that ends without a submit gives its room back
        model.release.set()
        assert [r.score for r in await asyncio.gather(*running, *late, *kept)] == [1, 9, 2, 3]
        await batcher.stop()
        with pytest.raises(BatcherClosed), batcher.reserve(1):
            pass

    asyncio.run(scenario())


def test_a_failing_batch_fails_every_request_in_it_and_the_worker_goes_on() -> None:
    model = FakeModel()

    async def scenario() -> None:
        batcher = make_batcher(model)
        batcher.start()
        model.release.clear()
        blocker = batcher.submit([image(1)])
        await wait_started(model)
        model.fail_when = 3
        doomed = [batcher.submit([image(2)])[0], batcher.submit([image(3)])[0]]  # one batch: [2, 3]
        model.release.set()
        await asyncio.gather(*blocker)
        outcomes = await asyncio.gather(*doomed, return_exceptions=True)
        assert all(isinstance(o, InferenceFailed) and "model exploded" in str(o) for o in outcomes)
        model.fail_when = None
        (after,) = batcher.submit([image(9)])
        assert (await asyncio.wait_for(after, 2)).score == 9
        assert batcher._metrics is not None
        assert batcher._metrics.inference_failures._value.get() == 1
        await batcher.stop()

    asyncio.run(scenario())


def test_a_wrong_number_of_scores_is_an_inference_failure() -> None:
    async def scenario() -> None:
        batcher = Batcher(
            lambda batch: np.zeros(len(batch) + 1), max_batch_size=4, max_delay_s=0, max_queue=8
        )
        batcher.start()
        (future,) = batcher.submit([image(1)])
        with pytest.raises(InferenceFailed, match="shape"):
            await asyncio.wait_for(future, 2)
        await batcher.stop()

    asyncio.run(scenario())


def test_cancelled_requests_are_dropped_before_the_run() -> None:
    model = FakeModel()

    async def scenario() -> None:
        batcher = make_batcher(model)
        batcher.start()
        model.release.clear()
        blocker = batcher.submit([image(1)])
        await wait_started(model)
        (gone,) = batcher.submit([image(2)])
        (kept,) = batcher.submit([image(3)])
        gone.cancel()
        model.release.set()
        await asyncio.gather(*blocker)
        assert (await kept).score == 3
        await batcher.stop()

    asyncio.run(scenario())
    assert model.batches == [[1], [3]]


def test_stop_runs_queued_work_then_refuses_new_work() -> None:
    model = FakeModel()

    async def scenario() -> None:
        batcher = make_batcher(model)
        batcher.start()
        model.release.clear()
        futures = batcher.submit([image(1)])
        await wait_started(model)
        futures += batcher.submit([image(v) for v in range(2, 10)])
        stopping = asyncio.create_task(batcher.stop(timeout_s=5))
        await asyncio.sleep(0.01)
        with pytest.raises(BatcherClosed):
            batcher.submit([image(10)])
        model.release.set()
        await stopping
        assert [r.score for r in await asyncio.gather(*futures)] == list(range(1, 10))

    asyncio.run(scenario())


def test_stop_timeout_fails_what_is_left_so_nothing_hangs() -> None:
    model = FakeModel()

    async def scenario() -> None:
        batcher = make_batcher(model)
        batcher.start()
        model.release.clear()
        running = batcher.submit([image(1)])
        await wait_started(model)
        queued = batcher.submit([image(2)])
        await batcher.stop(timeout_s=0.1)
        outcomes = await asyncio.wait_for(asyncio.gather(*running, *queued, return_exceptions=True), 1)
        assert all(isinstance(o, BatcherClosed) for o in outcomes)
        model.release.set()

    asyncio.run(scenario())


def test_each_request_gets_its_own_images_scores_under_concurrency() -> None:
    model = FakeModel()

    async def one_request(batcher: Batcher, values: list[int]) -> list[float]:
        with batcher.incoming():
            await asyncio.sleep(np.random.default_rng(values[0]).uniform(0, 0.01))
            futures = batcher.submit([image(v) for v in values])
        return [r.score for r in await asyncio.gather(*futures)]

    async def scenario() -> None:
        batcher = make_batcher(model, max_batch_size=8, max_delay_s=0.005, max_queue=1000)  # room for all 120
        batcher.start()
        requests = [[(7 * i + k) % 256 for k in range(1 + i % 3)] for i in range(60)]
        answers = await asyncio.gather(*(one_request(batcher, values) for values in requests))
        await batcher.stop()
        assert answers == [[float(v) for v in values] for values in requests]

    asyncio.run(scenario())
    assert max(len(b) for b in model.batches) > 1  # batching really happened
    assert max(len(b) for b in model.batches) <= 8
