"""Serving workers (issue 23): one service process against several, and batching at low load.

    python -m benchmarks.serving.workers --synthetic --out benchmarks/serving/workers/fast_graph
    python -m benchmarks.serving.workers --bundle bundles/demo --out benchmarks/serving/workers/demo

Every variant is up at once (an idle server costs nothing) and the variants take turns point by
point, so a change in the machine's background load hits them alike; compare them as ratios. The
grid and the half-load runs are measured `--rounds` times, and the goals read each figure's median
over the rounds: one 6-second window on 2 shared cores can catch a background burst (single runs of
the same code gave half-load p99/p50 from 1.9 to 6.9). Every round is kept in results.json and its
spread shown in the report.
  1. saturation: closed loop at each concurrency x images per request, for DEDE_WORKERS 1, 2, ...;
     server CPU counts the supervisor, every worker and their decode processes (the load generator
     shares the cores, so images per server CPU-second is the fair measure of cost);
  2. half load: an open loop at half of each variant's saturation (p99 / p50);
  3. low load (one worker): the batched server against the batch-1 server at one client, one image
     per request, in alternating rounds: what batching costs when there is nothing to batch.
`--synthetic` is the stand-in graph of benchmarks/serving/fast_graph (well under a millisecond per
image): where one process, not the model, is the limit.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.serving.loadgen import closed_loop, open_loop
from benchmarks.serving.raw import RawSession
from benchmarks.serving.run import (
    _run_async,
    bodies_for,
    check_scores,
    commit,
    load_test_images,
    machine,
    measure_point,
)
from benchmarks.serving.server import BenchServer, open_benchmark_bundle

HERE = Path(__file__).resolve().parent / "workers"
GOALS = {
    "fast_graph_saturation_ratio": 1.25,  # 2 workers over 1, where one process is the limit
    "fast_graph_images_per_cpu_ratio": 0.9,
    "model_bound_saturation_ratio": 0.95,  # 2 workers over 1, where the model already uses every core
    "p99_over_p50_at_half_load": 3.0,
    "low_load_images_per_s_ratio": 0.97,  # batched over batch-1 at one client
    "low_load_p50_extra_ms": 0.2,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",")]

    def positive(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"a whole number of at least 1, not {text!r}")
        return int(text)

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving.workers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--bundle", type=Path, default=Path("bundles/demo"))
    parser.add_argument("--synthetic", action="store_true", help="the near-free stand-in graph (fast graph)")
    parser.add_argument("--out", type=Path, help="folder for results.json and REPORT.md")
    parser.add_argument("--workers", type=ints, default=[1, 2])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument(
        "--rounds",
        type=positive,
        default=3,
        help="times the grid and the half-load runs are measured (medians)",
    )
    parser.add_argument("--concurrency", type=ints, default=[1, 8, 32, 128])
    parser.add_argument("--images-per-request", type=ints, default=[1, 8])
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-batch-delay-ms", type=float, default=2.0)
    parser.add_argument(
        "--low-load-rounds", type=int, default=6, help="alternating rounds of the low-load pair"
    )
    parser.add_argument("--note", default="")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python -m benchmarks.serving.workers " + shlex.join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="dede-workers-") as scratch:
        scratch_dir = Path(scratch)
        bundle, bundle_path, out_dir = open_benchmark_bundle(
            args.bundle, args.synthetic, scratch_dir, args.out, HERE, "serving-workers-dry-run"
        )
        encoded, arrays = load_test_images(bundle, 512)
        expected = RawSession(bundle, arrays[:8]).detector.score(arrays[:8])
        common = {
            "access_log": "false",
            "log_level": "warning",
            "max_queue": 4096,
            "max_images_per_request": 64,
        }
        batched = {
            **common,
            "max_batch_size": args.max_batch_size,
            "max_batch_delay_ms": args.max_batch_delay_ms,
        }
        configs = {f"workers{n}": {**batched, "workers": n} for n in args.workers}
        configs["batch1"] = {**common, "max_batch_size": 1, "max_batch_delay_ms": 0, "workers": 1}
        servers = {
            name: BenchServer(bundle_path, scratch_dir / f"server-{name}.log", **cfg)
            for name, cfg in configs.items()
        }
        results: dict = {
            "note": args.note,
            "command": command,
            "commit": commit(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            "bundle": "synthetic fast graph (tests/service/synthetic_bundle.py)"
            if args.synthetic
            else str(bundle_path),
            "protocol": {
                "seconds_per_point": args.seconds,
                "warmup_s": args.warmup,
                "images": len(encoded),
                "rounds": args.rounds,
            },
            "servers": {},
        }
        try:
            for name, server in servers.items():
                server.wait_ready()
                results["servers"][name] = {
                    "settings": configs[name],
                    "scores_match_raw_session": check_scores(server, encoded, expected),
                    "points": [],
                }
            saturating = [name for name in servers if name != "batch1"]
            for round_ in range(args.rounds):
                print(f"round {round_ + 1}/{args.rounds}", flush=True)
                for ipr in args.images_per_request:
                    bodies = bodies_for(encoded, ipr)
                    for concurrency in args.concurrency:
                        # Alternate which variant goes first, so neither always follows the other.
                        for name in saturating if round_ % 2 == 0 else saturating[::-1]:
                            point = measure_point(name, servers[name], bodies, ipr, concurrency, args)
                            point["round"] = round_
                            point["images_per_server_cpu_s"] = round(
                                point["images_per_s"] / max(point["server_cpu_cores"], 1e-9), 1
                            )
                            results["servers"][name]["points"].append(point)
            for name in saturating:
                server = results["servers"][name]
                server["median_points"] = median_points(server["points"])
                server["half_load"] = []
            for round_ in range(args.rounds):
                for name in saturating if round_ % 2 == 0 else saturating[::-1]:
                    for ipr in args.images_per_request:
                        rate = 0.5 * _saturation(results["servers"][name], ipr)["images_per_s"] / ipr
                        load = _run_async(
                            open_loop(
                                servers[name].url,
                                bodies_for(encoded, ipr),
                                ipr,
                                rate,
                                args.seconds,
                                args.warmup,
                            )
                        )
                        point = {**load.as_dict(), "round": round_}
                        results["servers"][name]["half_load"].append(point)
                        print(
                            f"  {name} open loop {rate:.0f} req/s x{ipr}: p50 {point['p50_ms']:.2f} "
                            f"p99 {point['p99_ms']:.2f}",
                            flush=True,
                        )
            results["low_load"] = low_load(servers["workers1"], servers["batch1"], encoded, args)
        finally:
            for server in servers.values():
                server.stop()
        results["goals"] = goals(results, args.synthetic)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        write_report(results, out_dir)
        print(json.dumps(results["goals"], indent=2))


def low_load(
    batched: BenchServer, batch1: BenchServer, encoded: list[bytes], args: argparse.Namespace
) -> dict:
    """One client, one image per request: the batched and the batch-1 server in alternating rounds."""
    bodies = bodies_for(encoded, 1)
    rounds: dict[str, list[dict]] = {"batched": [], "batch1": []}
    for turn in range(args.low_load_rounds):
        order = (("batched", batched), ("batch1", batch1))
        for name, server in order if turn % 2 == 0 else order[::-1]:
            load = _run_async(closed_loop(server.url, bodies, 1, 1, args.seconds, args.warmup))
            rounds[name].append(load.as_dict())
    summary = {
        name: {
            "images_per_s": round(statistics.median(r["images_per_s"] for r in runs), 1),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in runs), 3),
            "p99_ms": round(statistics.median(r["p99_ms"] for r in runs), 3),
        }
        for name, runs in rounds.items()
    }
    print(f"  low load: {summary}", flush=True)
    return {"rounds": rounds, "median": summary}


# Per-point figures whose median over the rounds the goals and the report read.
MEDIAN_FIELDS = (
    "images_per_s",
    "p50_ms",
    "p99_ms",
    "server_cpu_cores",
    "images_per_server_cpu_s",
    "mean_batch_size",
)


def median_points(points: list[dict]) -> list[dict]:
    """One point per (images per request, concurrency): each figure's median over the rounds, the
    errors summed, and the rounds' lowest and highest images/s (the spread)."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for point in points:
        groups.setdefault((point["images_per_request"], point["concurrency"]), []).append(point)
    merged = []
    for (ipr, concurrency), group in groups.items():
        rates = [p["images_per_s"] for p in group]
        merged.append(
            {
                "images_per_request": ipr,
                "concurrency": concurrency,
                "rounds": len(group),
                **{key: round(statistics.median(p[key] for p in group), 3) for key in MEDIAN_FIELDS},
                "images_per_s_range": [min(rates), max(rates)],
                "errors": sum(p["errors"] for p in group),
            }
        )
    return merged


def _saturation(server: dict, ipr: int) -> dict:
    """The median point with the most images/s at this many images per request."""
    return max(
        (p for p in server["median_points"] if p["images_per_request"] == ipr),
        key=lambda p: p["images_per_s"],
    )


def half_load_ratios(server: dict, ipr: int) -> list[float]:
    """p99 / p50 of each round's open loop at half of saturation."""
    return [
        round(p["p99_ms"] / p["p50_ms"], 2)
        for p in server.get("half_load", [])
        if p["images_per_request"] == ipr
    ]


def goals(results: dict, fast_graph: bool) -> dict:
    servers = results["servers"]
    out: dict = {"targets": GOALS}
    names = sorted(
        (n for n in servers if n.startswith("workers")), key=lambda n: int(n.removeprefix("workers"))
    )
    one = servers["workers1"]
    per_request = sorted({p["images_per_request"] for p in one["median_points"]})
    for name in names[1:]:
        for ipr in per_request:
            base, more = _saturation(one, ipr), _saturation(servers[name], ipr)
            key = f"{name}_over_workers1_x{ipr}"
            out[key] = {
                "saturation_ratio": round(more["images_per_s"] / base["images_per_s"], 3),
                "images_per_server_cpu_ratio": round(
                    more["images_per_server_cpu_s"] / base["images_per_server_cpu_s"], 3
                ),
                "goal_saturation_ratio": GOALS[
                    "fast_graph_saturation_ratio" if fast_graph else "model_bound_saturation_ratio"
                ],
            }
    for name in names:
        for ipr in per_request:
            ratios = half_load_ratios(servers[name], ipr)
            if ratios:
                out[f"{name}_p99_over_p50_at_half_load_x{ipr}"] = {
                    "median": round(statistics.median(ratios), 2),
                    "rounds": ratios,
                }
    median = results["low_load"]["median"]
    out["low_load_images_per_s_ratio"] = round(
        median["batched"]["images_per_s"] / median["batch1"]["images_per_s"], 3
    )
    out["low_load_p50_extra_ms"] = round(median["batched"]["p50_ms"] - median["batch1"]["p50_ms"], 3)
    out["verdicts"] = verdicts(out, fast_graph)
    return out


def verdicts(figures: dict, fast_graph: bool) -> list[dict]:
    """Each goal of issue 23 that this run measures: its figure and whether it is met."""
    rows = []

    def row(goal: str, figure: float, met: bool) -> None:
        rows.append({"goal": goal, "figure": figure, "met": met})

    for key, value in figures.items():
        if re.fullmatch(r"workers\d+_over_workers1_x\d+", key):
            ratio, goal = value["saturation_ratio"], value["goal_saturation_ratio"]
            row(f"{key}: saturation >= {goal}x", ratio, ratio >= goal)
            if fast_graph:
                cpu_ratio, cpu_goal = (
                    value["images_per_server_cpu_ratio"],
                    GOALS["fast_graph_images_per_cpu_ratio"],
                )
                row(f"{key}: images per server CPU-s >= {cpu_goal}x", cpu_ratio, cpu_ratio >= cpu_goal)
        elif "_p99_over_p50_at_half_load_" in key:
            bound = GOALS["p99_over_p50_at_half_load"]
            row(f"{key}: median over rounds <= {bound}", value["median"], value["median"] <= bound)
    ratio, extra = figures["low_load_images_per_s_ratio"], figures["low_load_p50_extra_ms"]
    row(f"low load: batched images/s >= {GOALS['low_load_images_per_s_ratio']}x batch-1", ratio,
        ratio >= GOALS["low_load_images_per_s_ratio"])  # fmt: skip
    row(f"low load: batched p50 within {GOALS['low_load_p50_extra_ms']} ms of batch-1", extra,
        extra <= GOALS["low_load_p50_extra_ms"])  # fmt: skip
    return rows


def write_report(results: dict, out_dir: Path) -> None:
    goals_ = results["goals"]
    lines = [
        "# Serving workers",
        "",
        f"Made by `{results['command']}` at commit `{results['commit']}` on {results['date']}; "
        f"{results['machine']['cpu']}, {results['machine']['logical_cores']} logical cores, load average at "
        f"start {results['machine']['load_average_at_start']}. Bundle: {results['bundle']}. Every figure is in "
        "`results.json` beside this file.",
        "",
    ]
    if results["note"]:
        lines += [f"> **Note:** {results['note']}", ""]
    rounds = results["protocol"].get("rounds", 1)
    lines += [
        "## Saturation (closed loop)",
        "",
        f"Each figure is the median over {rounds} round(s); `images/s range` is the rounds' lowest and highest.",
        "",
    ]
    header = (
        "| server | clients | img/request | images/s | images/s range | p50 ms | p99 ms | server CPU | "
        "images per server CPU-s | errors |"
    )
    lines += [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, server in results["servers"].items():
        for p in server.get("median_points", []):
            low, high = p["images_per_s_range"]
            lines.append(
                f"| {name} | {p['concurrency']} | {p['images_per_request']} | {p['images_per_s']:.0f} | "
                f"{low:.0f}-{high:.0f} | {p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['server_cpu_cores']:.2f} | "
                f"{p['images_per_server_cpu_s']:.0f} | {p['errors']} |"
            )
    lines += [
        "",
        "## Half load (open loop at half of each server's median saturation)",
        "",
        "| server | img/request | round | requests/s | p50 ms | p99 ms | p99/p50 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, server in results["servers"].items():
        for p in server.get("half_load", []):
            lines.append(
                f"| {name} | {p['images_per_request']} | {p.get('round', 0) + 1} | {p['requests_per_s']:.0f} | "
                f"{p['p50_ms']:.2f} | {p['p99_ms']:.2f} | {p['p99_ms'] / p['p50_ms']:.2f} |"
            )
    lines += ["", "## Goals", "", "| goal | figure | |", "|---|---:|---|"]
    for verdict in goals_["verdicts"]:
        lines.append(
            f"| {verdict['goal']} | {verdict['figure']} | {'meets' if verdict['met'] else 'misses'} |"
        )
    lines.append("")
    for key, value in goals_.items():
        if key not in ("targets", "verdicts"):
            lines.append(f"- `{key}`: {value}")
    lines += [
        "",
        f"Targets: {goals_['targets']}. Scores equal the raw session's: "
        + ", ".join(f"{n} {s['scores_match_raw_session']}" for n, s in results["servers"].items())
        + ".",
        "",
        "## Low load (one client, one image per request, one worker)",
        "",
        "| server | images/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, summary in results["low_load"]["median"].items():
        lines.append(
            f"| {name} | {summary['images_per_s']:.0f} | {summary['p50_ms']:.3f} | {summary['p99_ms']:.3f} |"
        )
    lines.append("")
    (out_dir / "REPORT.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
