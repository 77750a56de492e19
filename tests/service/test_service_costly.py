"""Issue 21: images whose decoding cost lies in their structure are refused in time, their CPU is
returned, a good image beside them is scored, and none of it holds up shutdown.

The files come from tests/service/costly.py, built at test time. The timing goals (1 s, 1 CPU-second,
p99 under load) are measured by the reliability benchmark's "costly structure" section; the bounds
here are generous, to catch a hang, not to time anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from conftest import ServerProcess, encode, random_images, start_server
from costly import (
    COSTLY_CLASSES,
    bmp_rle,
    jpeg_many_scans,
    jpeg_restart_broken,
    jpeg_with_exif,
    png_with_text,
    webp_many_frames,
)
from PIL import Image

from models.bundle import InputSpec
from service.decode_step import Abandonment
from service.decoding import DecodeLimits, ImageRejected, decode_cost, decode_image
from service.errors import ServiceError
from service.settings import Settings
from service.structure import StructureLimits

SPEC = InputSpec(height=32, width=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
LIMITS = DecodeLimits(25_000_000)
CLASS_NAMES = [c.name for c in COSTLY_CLASSES]
# What each class is refused as, with the default limits.
EXPECTED = {
    "jpeg_many_scans": (422, "DEDE_JPEG_MAX_SCANS"),
    "jpeg_cmyk_many_scans": (422, "DEDE_JPEG_MAX_SCANS"),
    "jpeg_restart_missing": (400, "restart marker"),
    "jpeg_restart_shuffled": (400, "restart markers are out of order"),
    "jpeg_many_app": (422, "DEDE_JPEG_MAX_SEGMENTS"),
    "bmp_rle": (422, "DEDE_BMP_MAX_RLE_PIXELS"),
    "png_many_chunks": (422, "DEDE_PNG_MAX_CHUNKS"),
    "png_many_iccp": (400, "more than one iCCP chunk"),
    "webp_many_frames": (422, "DEDE_WEBP_MAX_FRAMES"),
}
GOOD = encode(random_images(1, seed=3)[0])
# A progressive JPEG of 50,000 scans over 2048x2048 pixels: ~8 s of decoding when let through.
ENDLESS_SCANS = {"jpeg_max_scans": 100_000}


def _ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def process_tree(pid: int) -> set[int]:
    """`pid` and every process below it (the fork server, the decode workers)."""
    parents, tree, grew = _parents(), {pid}, True
    while grew:
        below = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= below
        grew = bool(below)
    return tree


def alive(pid: int) -> bool:
    """Running, or able to run: a zombie (dead, not yet reaped) uses no CPU."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def describe(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "gone"


def cpu_seconds(pid: int) -> float:
    return sum(_ticks(p) for p in process_tree(pid)) / os.sysconf("SC_CLK_TCK")


def busy_after(server: ServerProcess, seconds: float = 0.6) -> float:
    """CPU-seconds the server and its workers spend over `seconds` of doing nothing asked of them."""
    before = cpu_seconds(server.process.pid)
    time.sleep(seconds)
    return cpu_seconds(server.process.pid) - before


def post(url: str, *images: bytes, timeout: float = 30) -> httpx.Response:
    files = [("images", (f"{i}.bin", data, "application/octet-stream")) for i, data in enumerate(images)]
    return httpx.post(url + "/detect", files=files, timeout=timeout)


# -- structure checks, in-process --------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_each_costly_class_is_refused_by_its_structure_before_decoding(name: str) -> None:
    costly = next(c for c in COSTLY_CLASSES if c.name == name)
    status, named = EXPECTED[name]
    for data in (costly.make_small(), costly.make()):
        with pytest.raises(ImageRejected) as refused:
            decode_cost(data, LIMITS)
        assert (refused.value.status, named in refused.value.message) == (status, True)
        with pytest.raises(ImageRejected):
            decode_image(data, SPEC, LIMITS)


def test_well_formed_files_pass_the_structure_checks_and_decode() -> None:
    picture = Image.fromarray(random_images(1, seed=5, size=(97, 61))[0])
    files = {
        "progressive": encode(random_images(1, seed=5, size=(97, 61))[0], "JPEG", progressive=True),
        "restart_blocks": encode(random_images(1, seed=6)[0], "JPEG", restart_marker_blocks=3),
        "restart_rows_progressive": encode(
            random_images(1, seed=6, size=(80, 50))[0], "JPEG", progressive=True, restart_marker_rows=1
        ),
        "cmyk_progressive": _save(picture.convert("CMYK"), "JPEG", progressive=True),
        "rle_bmp_under_limit": bmp_rle(300, 200),
        "png": encode(random_images(1, seed=8)[0]),
        "animated_webp": webp_many_frames(20),
        "jpeg_many_scans_under_limit": jpeg_many_scans(64, 64, 60),
    }
    for name, data in files.items():
        assert decode_cost(data, LIMITS) >= 1, name
        assert decode_image(data, SPEC, LIMITS).shape == (3, 32, 32), name


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_junk_between_segments_does_not_hide_the_scans_behind_it() -> None:
    data = jpeg_many_scans(64, 64, 300)
    sos = data.index(b"\xff\xda")
    with_junk = data[:sos] + b"junk" + data[sos:]  # libjpeg and Pillow skip it and decode on
    with pytest.raises(ImageRejected, match="DEDE_JPEG_MAX_SCANS"):
        decode_cost(with_junk, LIMITS)


def test_the_limits_are_settings() -> None:
    lenient = DecodeLimits(25_000_000, StructureLimits(jpeg_max_scans=400))
    # pixels x scans, plus a pass per byte of the JFIF segment's 14 (metadata Pillow only copies)
    assert decode_cost(jpeg_many_scans(64, 64, 300), lenient) == 64 * 64 * 300 + 14
    with pytest.raises(ImageRejected, match="restart"):
        decode_cost(jpeg_restart_broken(64, 64, "missing"), lenient)  # not a limit: always checked


def test_metadata_is_charged_to_the_cost_and_never_opened_on_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 1x1 image is a thumbnail by its pixels, but Pillow parses an EXIF directory in Python and
    inflates every compressed PNG chunk when it opens the file: 64 such files in one request held the
    event loop for seconds (decoded there as thumbnails, opened there to read their size)."""
    settings = Settings()
    heavy = {"png_text": png_with_text(64), "jpeg_exif": jpeg_with_exif(5_400)}
    plain = {"png": encode(random_images(1, seed=9)[0]), "jpeg": encode(random_images(1, seed=9)[0], "JPEG")}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cost of a JPEG or PNG is read without opening it with Pillow")

    with monkeypatch.context() as patched:
        patched.setattr("service.decoding.Image.open", refuse)
        costs = {name: decode_cost(data, LIMITS) for name, data in {**heavy, **plain}.items()}
    assert costs["png_text"] > settings.inprocess_decode_max_cost  # 64 MiB to inflate: a worker's
    assert costs["jpeg_exif"] > settings.inline_decode_max_pixels  # off the event loop
    assert costs["png"] == 32 * 32 and costs["jpeg"] < 2 * 32 * 32  # thumbnails stay thumbnails
    for data in heavy.values():
        assert decode_image(data, SPEC, LIMITS).shape == (3, 32, 32)  # refused by nothing: only routed


# -- a real server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_server(
    synthetic_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    server = start_server(synthetic_bundle, tmp_path_factory.mktemp("logs") / "costly.log")
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def budget_server(
    synthetic_bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Structure limits lifted, so the costly file reaches a worker; a short budget stops it."""
    log_path = tmp_path_factory.mktemp("logs") / "budget.log"
    server = start_server(synthetic_bundle, log_path, decode_budget_s=0.3, **ENDLESS_SCANS)
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def endless_scans() -> bytes:
    return jpeg_many_scans(2048, 2048, 50_000)


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_a_costly_upload_is_refused_in_time_and_a_good_image_beside_it_is_scored(
    default_server: ServerProcess, name: str
) -> None:
    costly = next(c for c in COSTLY_CLASSES if c.name == name).make()
    status, named = EXPECTED[name]
    started = time.monotonic()
    alone = post(default_server.url, costly)
    beside = post(default_server.url, costly, GOOD)
    assert time.monotonic() - started < 10
    assert alone.status_code == status and named in alone.json()["error"]["message"]
    refused, scored = beside.json()["images"]
    assert beside.status_code == 200 and refused["score"] is None and named in refused["error"]["message"]
    assert scored["score"] is not None
    assert busy_after(default_server) < 0.3  # nothing left running after the answer


def test_a_decode_over_budget_is_stopped_its_cpu_returned_and_the_batch_scored(
    budget_server: ServerProcess, endless_scans: bytes
) -> None:
    workers_before = process_tree(budget_server.process.pid)
    started = time.monotonic()
    response = post(budget_server.url, endless_scans, GOOD)
    assert time.monotonic() - started < 10
    over, scored = response.json()["images"]
    assert response.status_code == 200 and over["error"]["code"] == "decode_budget_exceeded"
    assert "DEDE_DECODE_BUDGET_S" in over["error"]["message"] and scored["score"] is not None
    assert busy_after(budget_server) < 0.3
    killed = workers_before - process_tree(budget_server.process.pid)
    assert killed, "the worker that overran was not killed"
    assert not [pid for pid in killed if alive(pid)]
    again = post(budget_server.url, endless_scans)  # the replacement takes the next one
    assert again.status_code == 422 and again.json()["error"]["code"] == "decode_budget_exceeded"
    assert post(budget_server.url, GOOD).status_code == 200


def _in_flight(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    line = next(line for line in text.splitlines() if line.startswith("dede_requests_in_flight "))
    return float(line.split()[1])


def test_a_request_refused_for_its_bytes_is_held_back_out_of_every_count(
    synthetic_bundle: Path, tmp_path: Path
) -> None:
    """DEDE_REFUSAL_DELAY_S: a refusal of every image waits, holding neither a queue place nor an
    in-flight slot (a good request scores meanwhile); a request with a good image is answered at once."""
    delay_s = 1.5
    server = start_server(synthetic_bundle, tmp_path / "log", refusal_delay_s=delay_s, max_in_flight=1)
    try:
        costly = next(c for c in COSTLY_CLASSES if c.name == "png_many_chunks").make()
        held: dict[str, object] = {}

        def refused_alone() -> None:
            started = time.monotonic()
            held["response"], held["seconds"] = post(server.url, costly), time.monotonic() - started

        sender = threading.Thread(target=refused_alone)
        sender.start()
        time.sleep(delay_s / 3)  # the refused request is in its wait now
        assert _in_flight(server) == 0
        started = time.monotonic()
        mixed = post(server.url, costly, GOOD)  # max_in_flight=1: admitted only if the wait holds no slot
        mixed_s = time.monotonic() - started
        sender.join(30)
        response = held["response"]
        assert isinstance(response, httpx.Response) and response.status_code == 422
        assert "DEDE_PNG_MAX_CHUNKS" in response.json()["error"]["message"]
        assert held["seconds"] >= delay_s
        assert mixed.status_code == 200 and mixed_s < delay_s
        refused, scored = mixed.json()["images"]
        assert refused["score"] is None and scored["score"] is not None
    finally:
        server.terminate()


def test_the_v2_protocol_holds_back_its_refusals_too(synthetic_bundle: Path, tmp_path: Path) -> None:
    import base64

    delay_s = 1.0
    server = start_server(synthetic_bundle, tmp_path / "log", refusal_delay_s=delay_s)
    try:
        costly = next(c for c in COSTLY_CLASSES if c.name == "jpeg_many_app").make()
        inputs = [
            {
                "name": "encoded_images",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(costly).decode()],
            }
        ]
        started = time.monotonic()
        response = httpx.post(server.url + "/v2/models/synthetic/infer", json={"inputs": inputs}, timeout=30)
        assert response.status_code == 422 and "DEDE_JPEG_MAX_SEGMENTS" in response.json()["error"]
        assert time.monotonic() - started >= delay_s
    finally:
        server.terminate()


@pytest.fixture(scope="module")
def slow_server(synthetic_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Limits lifted and a long budget: only the request's deadline or its client stop a decode."""
    log_path = tmp_path_factory.mktemp("logs") / "slow.log"
    server = start_server(
        synthetic_bundle, log_path, decode_budget_s=60, request_timeout_s=1.0, **ENDLESS_SCANS
    )
    yield server
    server.terminate()


def test_past_the_request_deadline_the_decode_is_stopped_with_a_504(
    slow_server: ServerProcess, endless_scans: bytes
) -> None:
    response = post(slow_server.url, endless_scans)
    assert response.status_code == 504 and "DEDE_REQUEST_TIMEOUT_S" in response.json()["error"]["message"]
    assert busy_after(slow_server) < 0.3


def test_the_v2_protocol_stops_a_decode_past_the_deadline_too(
    slow_server: ServerProcess, endless_scans: bytes
) -> None:
    import base64

    inputs = [
        {
            "name": "encoded_images",
            "datatype": "BYTES",
            "shape": [1],
            "data": [base64.b64encode(endless_scans).decode()],
        }
    ]
    response = httpx.post(f"{slow_server.url}/v2/models/synthetic/infer", json={"inputs": inputs}, timeout=30)
    assert response.status_code == 504 and "DEDE_REQUEST_TIMEOUT_S" in response.json()["error"]
    assert busy_after(slow_server) < 0.3


def test_a_client_that_goes_away_stops_its_decode(slow_server: ServerProcess, endless_scans: bytes) -> None:
    with pytest.raises(httpx.ReadTimeout):
        post(slow_server.url, endless_scans, timeout=0.4)
    time.sleep(0.3)  # the disconnect reaches the server
    assert busy_after(slow_server) < 0.3
    assert post(slow_server.url, GOOD).status_code == 200


def test_sigterm_with_costly_decodes_in_flight_exits_in_time_and_loses_no_good_request(
    synthetic_bundle: Path, tmp_path: Path, endless_scans: bytes
) -> None:
    drain_s = 1.0
    server = start_server(
        synthetic_bundle,
        tmp_path / "sigterm.log",
        decode_budget_s=60,
        drain_timeout_s=drain_s,
        decode_processes=4,
        **ENDLESS_SCANS,
    )
    good: list[tuple[float, int | str]] = []
    signalled: list[float] = []

    def costly_client() -> None:
        with contextlib.suppress(httpx.HTTPError):
            post(server.url, endless_scans, timeout=30)

    def good_client() -> None:
        while not signalled or time.monotonic() < signalled[0] + 0.2:
            sent = time.monotonic()
            try:
                status: int | str = post(server.url, GOOD, timeout=30).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            good.append((sent, status))

    threads = [threading.Thread(target=costly_client) for _ in range(4)]
    threads.append(threading.Thread(target=good_client))
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the four costly decodes are running
    workers = process_tree(server.process.pid) - {server.process.pid}
    signalled.append(time.monotonic())
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(30)
    exit_s = time.monotonic() - signalled[0]
    for thread in threads:
        thread.join(30)
    server.terminate()
    assert code == 0
    assert exit_s < drain_s + 2 + 2, f"exit took {exit_s:.1f} s"  # the goal is drain + 2 s; slack for CI
    before = [status for sent, status in good if sent < signalled[0]]
    # Accepted before the signal: answered. (One sent as the signal came may get 503, never lost.)
    assert before.count(200) >= len(before) - 1 and set(before) <= {200, 503}
    time.sleep(0.5)
    left = [describe(pid) for pid in workers if alive(pid)]
    assert not left, f"outlived the service: {left}"


class _Connection:
    """A request's receive channel: `gone` set means the client disconnected."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.receives = 0

    async def receive(self) -> dict:
        self.receives += 1
        await self.gone.wait()
        return {"type": "http.disconnect"}


def _watched(coroutine_factory) -> tuple[object, dict, _Connection]:  # noqa: ANN001 - test helper
    """Runs `coroutine_factory(abandonment, connection)` under an Abandonment with a 0.3 s deadline:
    (what it returned or raised, the abandonment counts, the connection)."""
    state = SimpleNamespace(
        metrics=SimpleNamespace(abandoned=SimpleNamespace(labels=lambda reason: _Count(counts, reason))),
        settings=SimpleNamespace(request_timeout_s=0.3),
    )
    counts: dict[str, int] = {}
    connection = _Connection()

    async def main() -> object:
        deadline = asyncio.get_running_loop().time() + 0.3
        with Abandonment(connection, state, deadline) as abandonment:  # type: ignore[arg-type]
            try:
                return await coroutine_factory(abandonment, connection)
            except Exception as exc:  # noqa: BLE001 - the outcome is what the test looks at
                return exc

    return asyncio.run(main()), counts, connection


class _Count:
    def __init__(self, counts: dict[str, int], reason: str) -> None:
        self.counts, self.reason = counts, reason

    def inc(self) -> None:
        self.counts[self.reason] = self.counts.get(self.reason, 0) + 1


def test_a_request_answered_at_once_is_never_watched_nor_abandoned() -> None:
    async def fast(abandonment: Abandonment, connection: _Connection) -> str:
        return await abandonment.guard(asyncio.sleep(0, "scored"))

    outcome, counts, connection = _watched(fast)
    assert outcome == "scored" and counts == {} and connection.receives == 0


def test_past_its_deadline_the_guarded_work_is_cancelled_with_a_504() -> None:
    cancelled = []

    async def slow(abandonment: Abandonment, connection: _Connection) -> object:
        async def work() -> None:
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        return await abandonment.guard(work())

    outcome, counts, connection = _watched(slow)
    assert isinstance(outcome, ServiceError) and outcome.status == 504 and cancelled == [True]
    assert counts == {"deadline": 1} and connection.receives >= 1  # watched once it took a while


def test_a_client_gone_cancels_the_guarded_work_and_the_next_guard_refuses_at_once() -> None:
    async def leaves(abandonment: Abandonment, connection: _Connection) -> object:
        asyncio.get_running_loop().call_later(0.1, connection.gone.set)
        with contextlib.suppress(ServiceError):
            await abandonment.guard(asyncio.sleep(5))
        return await abandonment.guard(asyncio.sleep(0))

    outcome, counts, _ = _watched(leaves)
    assert isinstance(outcome, ServiceError) and outcome.status == 400 and counts == {"client_gone": 1}


def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    async def shut_down(abandonment: Abandonment, connection: _Connection) -> object:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().call_later(0.05, task.cancel)
        try:
            await abandonment.guard(asyncio.sleep(5))
        except asyncio.CancelledError:
            task.uncancel()
            return "cancelled"
        return "not cancelled"

    outcome, counts, _ = _watched(shut_down)
    assert outcome == "cancelled" and counts == {}


def test_a_request_waiting_for_a_decode_worker_does_not_hold_batches_back() -> None:
    """Batches wait for requests on their way (`Batcher.incoming`), but not for one whose images are
    in the worker processes: that decode takes far longer than a batch's delay."""
    from service.decode_step import DecodePlan, on_its_way

    class Marks:
        def __init__(self) -> None:
            self.count = 0

        @contextlib.contextmanager
        def incoming(self) -> Iterator[None]:
            self.count += 1
            yield

    in_process = DecodePlan([b"a", b"b"], [None, None], [0, 1], [], 2_000)
    mixed = DecodePlan([b"a", b"b"], [None, None], [0], [1], 1_000)
    batcher = Marks()
    for plan in (in_process, None, mixed):
        with on_its_way(batcher, plan):  # type: ignore[arg-type]
            pass
    assert batcher.count == 2
