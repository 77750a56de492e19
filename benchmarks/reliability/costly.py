"""Reliability benchmark, "costly structure" section (issue 21): uploads whose decoding cost lies in
their structure, against a real server process.

    python -m benchmarks.reliability.costly --synthetic --base-ref b31f78f

writes benchmarks/reliability/costly.json and the section at the end of REPORT.md. Parts:
  classes     every class of tests/service/costly.py at its hostile size, plus two files just inside
              the structure limits that go to the decode workers: each sent alone --repeats times;
              the answer's status and wall time, the CPU-seconds the server (with its fork server
              and decode workers) spent on it, and its CPU in the second after the answer (work
              still going on); beside it, what Pillow alone spends on the file (no checks, the
              decoding of b31f78f), capped at --pillow-cap-s;
  under_fire  good requests' latency in an open loop at --good-rate requests/s, first alone, then with
              --hostile-clients clients sending costly uploads (PHASES: paced, back to back, at-limit);
  throughput  saturation throughput (closed loop, as benchmarks/serving) of this commit and of
              --base-ref, both servers up, measured in turns (--rounds), same machine, same run;
  sigterm     SIGTERM with --hostile-clients costly decodes in flight and good clients sending:
              seconds to exit against the drain timeout, accepted good requests lost.
`--synthetic` serves the stand-in graph of tests/service/synthetic_bundle.py (the decode path does
not depend on the model; a near-free graph makes decoding the larger share of the throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.provenance import REPO_ROOT, run_record
from benchmarks.reliability.load import Workload, make_workload, open_loop, percentiles_ms
from benchmarks.serving.loadgen import CONTENT_TYPE, closed_loop, multipart_body
from benchmarks.serving.server import BenchServer, open_benchmark_bundle, tree_cpu_seconds
from service.settings import Settings

sys.path.insert(0, str(REPO_ROOT / "tests" / "service"))
from costly import COSTLY_CLASSES, bmp_rle, jpeg_many_scans  # noqa: E402 - the tests' own makers
from malformed import picture  # noqa: E402

HERE = Path(__file__).resolve().parent
COMMAND = "python -m benchmarks.reliability.costly"
GOALS = {"answer_s": 1.0, "server_cpu_s": 1.0, "cpu_after_answer_s": 0.05, "p99_ratio": 2.0}
GOALS |= {"throughput_ratio": 0.95, "sigterm_extra_s": 2.0, "accepted_lost": 0}
SERVER_DEFAULTS = {"access_log": "false", "log_level": "warning"}

# Inside every structure limit, but costly enough to be decoded by a worker process under the budget.
AT_LIMIT = {
    "jpeg_64_scans_4096px": lambda: jpeg_many_scans(4096, 4096, 64),
    "bmp_rle_1mpx": lambda: bmp_rle(1024, 1024),
}


def hostile_files() -> dict[str, bytes]:
    files = {c.name: c.make() for c in COSTLY_CLASSES}
    return files | {name: make() for name, make in AT_LIMIT.items()}


# -- CPU of the server and everything it started -------------------------------------------------------


def _post(url: str, data: bytes, timeout: float = 60) -> tuple[int | str, float]:
    started = time.perf_counter()
    try:
        response = httpx.post(
            url + "/detect", files=[("images", ("f", data, "application/octet-stream"))], timeout=timeout
        )
        status: int | str = response.status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    return status, time.perf_counter() - started


# -- classes -------------------------------------------------------------------------------------------


def _pillow_alone(data: bytes, queue: multiprocessing.Queue) -> None:
    import io

    from PIL import Image

    started = time.process_time()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        outcome = "decoded"
    except Exception as exc:  # noqa: BLE001 - what Pillow says is the measurement
        outcome = type(exc).__name__
    queue.put((time.process_time() - started, outcome))


def pillow_alone(data: bytes, cap_s: float) -> dict:
    """CPU-seconds Pillow spends decoding `data` with no checks (as b31f78f did), in a process killed at `cap_s`."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    process = multiprocessing.Process(target=_pillow_alone, args=(data, queue))
    started = time.perf_counter()
    process.start()
    process.join(cap_s)
    if process.is_alive():
        process.kill()
        process.join()
        return {
            "cpu_s": None,
            "wall_s": round(time.perf_counter() - started, 2),
            "outcome": f"over {cap_s:g} s",
        }
    cpu_s, outcome = queue.get()
    return {"cpu_s": round(cpu_s, 3), "wall_s": round(time.perf_counter() - started, 2), "outcome": outcome}


def classes_part(server: BenchServer, files: dict[str, bytes], args: argparse.Namespace) -> dict:
    pid = server.process.pid
    idle_before = tree_cpu_seconds(pid)
    time.sleep(2.0)
    idle_per_s = (tree_cpu_seconds(pid) - idle_before) / 2.0
    rows = {}
    for name, data in files.items():
        answers = []
        for _ in range(args.repeats):
            before = tree_cpu_seconds(pid)
            status, wall = _post(server.url, data)
            answered = tree_cpu_seconds(pid)
            time.sleep(1.0)
            after = tree_cpu_seconds(pid)
            answers.append(
                {
                    "status": status,
                    "wall_s": round(wall, 3),
                    "server_cpu_s": round(answered - before, 3),
                    "cpu_after_answer_s": round(max(0.0, after - answered - idle_per_s), 3),
                }
            )
        rows[name] = {
            "bytes": len(data),
            "statuses": sorted({str(a["status"]) for a in answers}),
            "max_wall_s": max(a["wall_s"] for a in answers),
            "max_server_cpu_s": max(a["server_cpu_s"] for a in answers),
            "max_cpu_after_answer_s": max(a["cpu_after_answer_s"] for a in answers),
            "answers": answers,
            "pillow_alone": pillow_alone(data, args.pillow_cap_s),
        }
        print(f"  {name}: {rows[name]['statuses']} in <= {rows[name]['max_wall_s']} s", flush=True)
    return {"repeats": args.repeats, "idle_cpu_per_s": round(idle_per_s, 4), "classes": rows}


# -- good latency with costly uploads in flight ---------------------------------------------------------


async def _hostile_client(
    url: str, files: list[bytes], start: int, stop: asyncio.Event, counts: dict, pause_s: float = 0.0
) -> None:
    """Sends costly uploads until `stop`, the next `pause_s` after the last is answered (0: back to
    back). Bodies are encoded up front, so that the client's own CPU stays off the measurement."""
    bodies = [multipart_body([data], ["costly"]) for data in files]
    async with httpx.AsyncClient(base_url=url, timeout=60, headers={"Content-Type": CONTENT_TYPE}) as http:
        turn = start
        while not stop.is_set():
            body = bodies[turn % len(bodies)]
            turn += 1
            try:
                key = str((await http.post("/detect", content=body)).status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            counts[key] = counts.get(key, 0) + 1
            if pause_s:
                await asyncio.sleep(pause_s)


def _hostile_process(
    url: str,
    files: list[bytes],
    clients: int,
    pause_s: float,
    stop: object,
    counts_out: multiprocessing.Queue,
) -> None:
    """The attacker, in a process of its own (as on another host): its clients' CPU and event loop
    stay out of the good client's, whose latency is what is measured."""

    async def run() -> dict:
        stopped, counts = asyncio.Event(), {}
        tasks = [
            asyncio.create_task(_hostile_client(url, files, n, stopped, counts, pause_s))
            for n in range(clients)
        ]
        while not stop.is_set():  # type: ignore[attr-defined] - a multiprocessing Event
            await asyncio.sleep(0.05)
        stopped.set()
        await asyncio.gather(*tasks)
        return counts

    counts_out.put(asyncio.run(run()))


def _good_latency(
    url: str,
    workload: Workload,
    rate: float,
    seconds: float,
    hostile: list[bytes],
    clients: int,
    pause_s: float,
) -> dict:
    counts: dict = {}
    attacker = None
    if clients:
        stop, counts_out = multiprocessing.Event(), multiprocessing.Queue()
        attacker = multiprocessing.Process(
            target=_hostile_process, args=(url, hostile, clients, pause_s, stop, counts_out)
        )
        attacker.start()
        time.sleep(1.0)  # the attacker's clients are up and sending
    try:
        shots, _ = asyncio.run(open_loop(url, workload, rate, seconds, 16))
    finally:
        if attacker is not None:
            stop.set()
            counts = counts_out.get(timeout=120)
            attacker.join(30)
    ok = [s.latency_s for s in shots if s.status == 200]
    return {
        "requests": len(shots),
        "ok": len(ok),
        "wrong_scores": sum(s.correct is False for s in shots),
        "latency_ms": percentiles_ms(ok),
        "hostile_answers": counts,
        "hostile_pause_s": pause_s,
        "hostile_in": "a process of its own",
    }


# (phase, which files, pause between one client's uploads)
PHASES = (
    ("issue_classes_paced", "issue", 1.0),
    ("issue_classes_back_to_back", "issue", 0.0),
    ("at_limit_back_to_back", "at_limit", 0.0),
)


def under_fire_part(
    server: BenchServer, workload: Workload, files: dict[str, bytes], args: argparse.Namespace
) -> dict:
    """Good latency alone, then with --hostile-clients clients sending costly uploads: the issue's
    classes (refused by their structure) one a second per client, then back to back (a flood of
    multi-megabyte bodies: what it costs is receiving them), then the files just inside the limits
    back to back (each keeps a decode worker busy up to its budget)."""
    chosen = {
        "issue": [data for name, data in files.items() if name not in AT_LIMIT],
        "at_limit": [files[name] for name in AT_LIMIT],
    }
    idle = _good_latency(server.url, workload, args.good_rate, args.seconds, [], 0, 0.0)
    phases = {"idle": idle}
    for phase, which, pause_s in PHASES:
        row = _good_latency(
            server.url, workload, args.good_rate, args.seconds, chosen[which], args.hostile_clients, pause_s
        )
        row["p99_ratio"] = round(row["latency_ms"]["p99"] / idle["latency_ms"]["p99"], 3)
        phases[phase] = row
        print(
            f"  good p99 {idle['latency_ms']['p99']} ms idle, {row['latency_ms']['p99']} ms {phase}",
            flush=True,
        )
    return {
        "good_rate": args.good_rate,
        "seconds": args.seconds,
        "hostile_clients": args.hostile_clients,
        **phases,
    }


# -- throughput against the base commit -----------------------------------------------------------------


def throughput_part(servers: dict[str, BenchServer], workload: Workload, args: argparse.Namespace) -> dict:
    measured: dict[str, list[float]] = {name: [] for name in servers}
    cpu_ms: dict[str, list[float]] = {name: [] for name in servers}  # server CPU per image served
    for turn in range(args.rounds):
        # Alternate which goes first: load from elsewhere drifts, and each gets both halves of a round.
        order = list(servers.items()) if turn % 2 == 0 else list(reversed(servers.items()))
        for name, server in order:
            before = tree_cpu_seconds(server.process.pid)
            load = asyncio.run(
                closed_loop(
                    server.url, workload.bodies, workload.images_per_request, args.clients, args.seconds
                )
            )
            spent = tree_cpu_seconds(server.process.pid) - before
            served = load.images_per_s * (args.seconds + 1.0)  # its 1 s warm-up is served too
            measured[name].append(load.images_per_s)
            cpu_ms[name].append(round(1000 * spent / max(1.0, served), 4))
            print(f"  {name}: {load.images_per_s} images/s, {cpu_ms[name][-1]} CPU-ms/image", flush=True)
    medians = {name: round(statistics.median(values), 1) for name, values in measured.items()}
    cpu_medians = {name: round(statistics.median(values), 4) for name, values in cpu_ms.items()}
    return {
        "clients": args.clients,
        "seconds": args.seconds,
        "images_per_request": workload.images_per_request,
        "images_per_s": measured,
        "median_images_per_s": medians,
        "ratio": round(medians["this"] / medians["base"], 4),
        "server_cpu_ms_per_image": cpu_ms,
        "median_server_cpu_ms_per_image": cpu_medians,
        "cpu_ratio": round(cpu_medians["this"] / cpu_medians["base"], 4),
    }


# -- SIGTERM with costly decodes in flight ---------------------------------------------------------------


def sigterm_part(
    server: BenchServer, workload: Workload, files: list[bytes], args: argparse.Namespace
) -> dict:
    drain_s = float(server.settings.get("drain_timeout_s", Settings.model_fields["drain_timeout_s"].default))
    records: list[dict] = []
    signalled: list[float] = []

    async def good_client(number: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            turn = number
            while not signalled or time.perf_counter() < signalled[0] + 0.5:
                body = workload.bodies[turn % len(workload.bodies)]
                turn += 8
                record: dict = {"sent": time.perf_counter()}
                try:
                    response = await http.post(
                        "/detect", content=body, headers={"Content-Type": CONTENT_TYPE}
                    )
                    record["status"] = response.status_code
                except httpx.HTTPError as exc:
                    record["status"] = type(exc).__name__
                records.append(record)
                if not isinstance(record["status"], int):
                    return
                if record["status"] == 503:
                    await asyncio.sleep(0.01)

    async def scenario() -> float:
        stop, counts = asyncio.Event(), {}
        hostile = [
            asyncio.create_task(_hostile_client(server.url, files, n, stop, counts))
            for n in range(args.hostile_clients)
        ]
        good = [asyncio.create_task(good_client(n)) for n in range(8)]
        await asyncio.sleep(2.0)
        signalled.append(time.perf_counter())
        server.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(server.process.wait, 180)
        exited = time.perf_counter() - signalled[0]
        stop.set()
        await asyncio.gather(*good, *hostile, return_exceptions=True)
        return exited

    exit_s = asyncio.run(scenario())
    before = [r for r in records if r["sent"] < signalled[0]]
    return {
        "drain_timeout_s": drain_s,
        "hostile_clients": args.hostile_clients,
        "good_clients": 8,
        "good_sent_before_signal": len(before),
        "good_answered_200": sum(r["status"] == 200 for r in before),
        "good_refused_503": sum(r["status"] == 503 for r in before),
        "accepted_lost": sum(r["status"] not in (200, 503) for r in before),
        "exit_code": server.process.returncode,
        "seconds_to_exit": round(exit_s, 2),
    }


# -- main -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=REPO_ROOT / "bundles" / "demo", help="bundle to serve")
    parser.add_argument("--synthetic", action="store_true", help="serve the stand-in graph")
    parser.add_argument("--base-ref", default="b31f78f", help="commit to compare throughput with")
    parser.add_argument("--parts", default="classes,under_fire,throughput,sigterm")
    parser.add_argument("--out", type=Path, default=HERE, help="folder of costly.json and REPORT.md")
    parser.add_argument("--note", default="")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pillow-cap-s", type=float, default=30.0)
    parser.add_argument("--good-rate", type=float, default=40.0, help="good requests/s in under_fire")
    parser.add_argument("--hostile-clients", type=int, default=4)
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="per under_fire phase, per throughput turn"
    )
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients for throughput")
    parser.add_argument("--rounds", type=int, default=3, help="throughput turns per commit")
    parser.add_argument("--images-per-request", type=int, default=8)
    return parser.parse_args(argv)


def _base_checkout(ref: str, scratch: Path) -> Path:
    path = scratch / "base"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(path), ref], cwd=REPO_ROOT, check=True)
    return path


def _base_bundle(base_root: Path, scratch: Path) -> Path:
    """The stand-in graph made by the base commit's own test helper: a newer manifest (fields added
    since) is refused by an older service, while the graph, and so every score, is the same."""
    out = scratch / "base-synthetic"
    maker = (
        "import sys; from pathlib import Path; sys.path.insert(0, 'tests/service'); "
        "from synthetic_bundle import make_synthetic_bundle; "
        f"make_synthetic_bundle(Path({str(out)!r}), extra_work=6, width_hidden=512)"
    )
    subprocess.run([sys.executable, "-c", maker], cwd=base_root, check=True)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    out_path = args.out / "costly.json"
    section = json.loads(out_path.read_text()) if out_path.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="dede-costly-") as scratch:
        scratch_dir = Path(scratch)
        bundle, bundle_path, _ = open_benchmark_bundle(
            args.bundle, args.synthetic, scratch_dir, None, HERE, "costly-dry-run"
        )
        spec = bundle.manifest.input
        rng = np.random.default_rng(0)
        pictures = [picture(rng, spec.height, spec.width) for _ in range(32 * args.images_per_request)]
        workload = make_workload(bundle, pictures, args.images_per_request)
        files = hostile_files()
        section.update(
            run=run_record(["-m", "benchmarks.reliability.costly", shlex.join(sys.argv[1:])]),
            goals=GOALS,
            bundle="synthetic (tests/service/synthetic_bundle.py)" if args.synthetic else str(args.bundle),
            base_ref=args.base_ref,
            note=args.note,
            refusal_delay_s=Settings.model_fields["refusal_delay_s"].default,  # the servers' default
        )

        def start(
            name: str, cwd: Path = REPO_ROOT, bundle: Path | None = None, **settings: object
        ) -> BenchServer:
            server = BenchServer(
                bundle or bundle_path, scratch_dir / f"{name}.log", cwd=cwd, **SERVER_DEFAULTS, **settings
            )
            server.wait_ready()
            return server

        def save() -> None:
            # The record as each part ends (its load average, its time); each part measured by this
            # run keeps it, parts left from an earlier run keep theirs.
            section["run"] = run_record(["-m", "benchmarks.reliability.costly", shlex.join(sys.argv[1:])])
            for part in parts:
                if part in section:
                    section[part]["run"] = section["run"]
            args.out.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(section, indent=2) + "\n")

        if "classes" in parts or "under_fire" in parts:
            server = start("this")
            try:
                if "classes" in parts:
                    print("classes ...", flush=True)
                    section["classes"] = classes_part(server, files, args)
                    save()
                if "under_fire" in parts:
                    print("under fire ...", flush=True)
                    section["under_fire"] = under_fire_part(server, workload, files, args)
                    save()
            finally:
                server.stop()
        if "throughput" in parts:
            print("throughput ...", flush=True)
            base_root = _base_checkout(args.base_ref, scratch_dir)
            try:
                base_bundle = _base_bundle(base_root, scratch_dir) if args.synthetic else bundle_path
                servers = {
                    "base": start("base", cwd=base_root, bundle=base_bundle),
                    "this": start("this-throughput"),
                }
                try:
                    section["throughput"] = throughput_part(servers, workload, args)
                    section["throughput"]["base_commit"] = subprocess.run(
                        ["git", "rev-parse", args.base_ref], cwd=REPO_ROOT, capture_output=True, text=True
                    ).stdout.strip()
                    save()
                finally:
                    for server in servers.values():
                        server.stop()
            finally:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(base_root)], cwd=REPO_ROOT, check=False
                )
        if "sigterm" in parts:
            print("sigterm ...", flush=True)
            server = start("sigterm")
            section["sigterm"] = sigterm_part(server, workload, [files[name] for name in AT_LIMIT], args)
            server.stop()
            save()
    _write_report(args.out)
    print(f"wrote {out_path} and {args.out / 'REPORT.md'}")


def _write_report(out_dir: Path) -> None:
    from benchmarks.reliability.report import write_report

    results_path = out_dir / "results.json"
    if results_path.is_file():
        write_report(json.loads(results_path.read_text()), out_dir)


if __name__ == "__main__":
    main()
