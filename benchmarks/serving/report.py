"""REPORT.md and throughput.png from a results.json (rerun alone: python -m benchmarks.serving.report DIR)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(results: dict, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"batched": "-", "batch1": "--"}
    for name, server in results["servers"].items():
        for ipr in sorted({p["images_per_request"] for p in server["points"]}):
            points = [p for p in server["points"] if p["images_per_request"] == ipr]
            conc = [p["concurrency"] for p in points]
            label = f"{name}, {ipr} img/request"
            left.plot(conc, [p["images_per_s"] for p in points], styles[name], marker="o", label=label)
            right.plot(conc, [p["p50_ms"] for p in points], styles[name], marker="o", label=f"{label} p50")
            right.plot(
                conc, [p["p99_ms"] for p in points], styles[name], marker="x", alpha=0.6, label=f"{label} p99"
            )
    ceiling = results["raw_session"]["ceiling_images_per_s"]
    left.axhline(ceiling, color="black", linewidth=1, label=f"raw ONNX Runtime session ({ceiling:.0f} img/s)")
    left.axhline(0.9 * ceiling, color="grey", linewidth=1, linestyle=":", label="0.9x ceiling (goal)")
    for axis, title, unit in ((left, "Throughput", "images / s"), (right, "Latency", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    right.set_yscale("log")
    left.set_yscale("log")
    left.legend(fontsize=7)
    right.legend(fontsize=6, ncol=2)
    fig.suptitle(
        f"dede service, {results['bundle']['model_name']} on {results['machine']['cpu']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(points: list[dict]) -> list[str]:
    rows = [
        "| clients | img/request | images/s | requests/s | p50 ms | p95 ms | p99 ms | mean batch | server CPU "
        "| generator CPU | load 1m | raw ceiling now | errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        rows.append(
            f"| {p['concurrency']} | {p['images_per_request']} | {p['images_per_s']:.0f} | {p['requests_per_s']:.0f} "
            f"| {p['p50_ms']:.1f} | {p['p95_ms']:.1f} | {p['p99_ms']:.1f} | {_measured(p, 'mean_batch_size', '.1f')} "
            f"| {_measured(p, 'server_cpu_cores', '.2f')} | {p['generator_cpu_cores']:.2f} "
            f"| {_measured(p, 'machine_load_1m', '.1f')} | {_measured(p, 'raw_ceiling_now', '.0f')} "
            f"| {p['errors']} |"
        )
    return rows


def _measured(point: dict, key: str, spec: str) -> str:
    """A figure the open-loop points do not collect shows as a dash, not as a zero."""
    return format(point[key], spec) if key in point else "-"


def _verdict(value: float, target: float, at_most: bool = False) -> str:
    met = value <= target if at_most else value >= target
    return f"{value:g} ({'meets' if met else 'misses'} {'<=' if at_most else '>='} {target:g})"


def write_report(results: dict, out_dir: Path) -> None:
    plot(results, out_dir / "throughput.png")
    raw, goals, targets = results["raw_session"], results["goals"], results["goals"]["targets"]
    machine = results["machine"]
    lines = [
        "# Serving benchmark",
        "",
        f"Made by `{results['command']}` at commit `{results['commit']}` on {results['date']}; every figure",
        "below is read from `results.json` beside this file.",
        "",
        *([f"> **Note:** {results['note']}", ""] if results.get("note") else []),
        f"- Machine: {machine['cpu']}, {machine['logical_cores']} logical cores, "
        f"{'GPU ' + machine['gpu'] + ', ' if machine.get('gpu') else ''}Python {machine['python']}, "
        f"load average at start {machine['load_average_at_start']}.",
        f"- Bundle: {results['bundle']['model_name']} {results['bundle']['model_version']} "
        f"({results['bundle']['encoder']}, input {results['bundle']['input']}), provider {raw['provider']}.",
        f"- Protocol: {results['protocol']['images']}; {results['protocol']['load_generator']}; "
        f"{results['protocol']['seconds_per_point']} s measured per point after "
        f"{results['protocol']['warmup_s']} s warm-up.",
        "",
        "![throughput and latency](throughput.png)",
        "",
        "## Goals",
        "",
        f"- Saturation vs the raw session at its best batch ({raw['best_batch_size']}), each grid point "
        f"against the ceiling measured just before it (same background load), best point "
        f"{goals.get('saturation_point', {})}: "
        f"{_verdict(goals['saturation_vs_ceiling'], targets['saturation_vs_ceiling'])}. Stricter, the highest "
        f"throughput ({goals['saturation_images_per_s']:.0f} images/s) over the highest ceiling seen in the run: "
        f"{goals.get('saturation_vs_highest_ceiling', float('nan')):g}.",
    ]
    for key, value in goals.items():
        if key.startswith("batched_vs_batch1_at_32_x"):
            ipr = key.rsplit("x", 1)[1]
            lines.append(
                f"- Batched vs batch-1 server at 32 clients, {ipr} image(s)/request: "
                f"{_verdict(value, targets['batched_vs_batch1_at_32'])}."
            )
        if key == "raw_best_over_raw_batch1":
            lines.append(
                f"- Headroom batching has on this model and machine: the raw session at its best batch is "
                f"{value:g}x the raw session at batch 1 (what batching buys the model alone; the servers' ratio "
                f"also carries their per-request costs)."
            )
        if key.startswith("p99_over_p50_at_half_load_x"):
            ipr = key.rsplit("x", 1)[1]
            lines.append(
                f"- p99/p50 at half of saturation (open loop), {ipr} image(s)/request: "
                f"{_verdict(value, targets['p99_over_p50_at_half_load'], at_most=True)}."
            )
    lines += [
        "",
        "## Raw ONNX Runtime session (no HTTP, no decoding)",
        "",
        "| batch | " + " | ".join(str(b) for b in raw["images_per_s_by_batch"]) + " |",
        "|---" * (len(raw["images_per_s_by_batch"]) + 1) + "|",
        "| images/s | " + " | ".join(f"{v:.0f}" for v in raw["images_per_s_by_batch"].values()) + " |",
    ]
    for name, server in results["servers"].items():
        settings = ", ".join(f"{k}={v}" for k, v in server["settings"].items())
        lines += ["", f"## Server: {name}", "", f"Settings: {settings}. Provider in use (/v1/models): "
                  f"{server.get('provider', 'not recorded')}. Scores equal the raw session's: "
                  f"{server['scores_match_raw_session']}.", ""]  # fmt: skip
        lines += _table(server["points"])
        if server.get("half_load"):
            lines += [
                "",
                "Open loop at half of saturation (latency counted from each request's scheduled start):",
                "",
            ]
            lines += _table(server["half_load"])
    lines += [
        "",
        "## Reading it",
        "",
        "- The load generator runs on the same cores as the server; its CPU use (cores) is in each row.",
        "- `server CPU` counts every thread of the server process (HTTP, decoding, ONNX Runtime).",
        "- `raw ceiling now`: the raw session at its best batch, measured just before that row's runs.",
        "- Run-to-run noise on a shared 2-core machine is about +-15%: compare rows of one run, as ratios.",
        "",
    ]
    (out_dir / "REPORT.md").write_text("\n".join(lines))


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    write_report(json.loads((folder / "results.json").read_text()), folder)
