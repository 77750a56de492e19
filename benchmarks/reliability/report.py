"""REPORT.md from a results.json (rerun alone: python -m benchmarks.reliability.report DIR)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

COMMAND = "python -m benchmarks.reliability.run"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("meets" if ok else "misses")


def _ms(p: dict, key: str) -> str:
    return f"{p[key]:.1f}" if key in p else "-"


def _run_line(section: dict) -> str:
    run = section["run"]
    machine = run["machine"]
    dirty = " (uncommitted changes)" if run.get("dirty") else ""
    load = section.get("load_average_at_start")
    shown = f"; load average at start {load[0]}, {load[1]}, {load[2]}" if load else ""
    return (
        f"`{run['command']}` at commit `{(run.get('commit') or 'unknown')[:12]}`{dirty}, "
        f"{run['finished_at']}; {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}{shown}."
    )


def goals_table(results: dict) -> list[str]:
    goals, sections = results["goals"], results["sections"]
    rows = ["| goal | target | measured | |", "|---|---|---|---|"]

    def row(goal: str, target: str, measured: str, ok: bool | None) -> None:
        rows.append(f"| {goal} | {target} | {measured} | {_verdict(ok)} |")

    malformed = sections.get("malformed")
    if malformed:
        row("server errors (5xx) on malformed uploads", "0", str(malformed["server_errors_5xx"]),
            malformed["server_errors_5xx"] == 0)  # fmt: skip
        row("server crashes", "0", str(len(malformed["crashes"])), not malformed["crashes"])
        fuzz = malformed.get("decoder_fuzz")
        if fuzz:
            row(f"decoder fuzz ({fuzz['inputs']:,} inputs): exceptions other than a rejection", "0",
                str(fuzz["other_exceptions"]), fuzz["other_exceptions"] == 0)  # fmt: skip
        worst = malformed["rejection_latency_ms"].get("max")
        row("slowest rejection", f"< {goals['rejection_ms']} ms", f"{worst} ms",
            worst is not None and worst < goals["rejection_ms"])  # fmt: skip
        row("answers showing internals", "0", str(malformed["answers_showing_internals"]),
            malformed["answers_showing_internals"] == 0)  # fmt: skip
        missing = malformed.get("per_image_errors_missing")
        row("answers to a bad image beside a good one lacking its per-image error", "0", str(missing),
            None if missing is None else missing == 0)  # fmt: skip
    soak = sections.get("soak")
    if soak:
        short = "" if soak["protocol"]["full_length"] else " (short run)"
        row(f"soak errors{short}", "0", str(soak["errors"]), soak["errors"] == 0)
        growth = soak["rss_mib"]["growth"]
        row(f"soak memory growth after warm-up{short}", f"< {goals['soak_rss_growth']:.0%}", f"{growth:.1%}",
            growth < goals["soak_rss_growth"])  # fmt: skip
        row(f"soak scores wrong{short}", "0", str(soak["scores_wrong"]), soak["scores_wrong"] == 0)
        first, last = soak["latency_first_window_ms"].get("p99"), soak["latency_last_window_ms"].get("p99")
        if first and last and "soak_p99_drift" in goals:
            row(f"soak latency stable: p99 last minute / first minute{short}", f"<= {goals['soak_p99_drift']}x",
                f"{last} / {first} ms = {last / first:.2f}x", last / first <= goals["soak_p99_drift"])  # fmt: skip
    overload = sections.get("overload")
    if overload:
        short = "" if overload["protocol"]["full_length"] else " (short run)"
        p99 = overload["refusal_latency_ms"].get("p99")
        row(f"overload: p99 of 503 refusals{short}", f"< {goals['overload_rejection_p99_ms']} ms",
            f"{p99} ms" if p99 is not None else "no refusal", None if p99 is None
            else p99 < goals["overload_rejection_p99_ms"])  # fmt: skip
        with_retry = overload["refused_with_retry_after"] == overload["refused_503"]
        row(f"overload: 503s with Retry-After{short}", "all",
            f"{overload['refused_with_retry_after']} of {overload['refused_503']}", with_retry)  # fmt: skip
        row(f"overload: accepted requests with a wrong score{short}", "0", str(overload["scores_wrong"]),
            overload["scores_wrong"] == 0)  # fmt: skip
        recovery = overload["recovery"]["seconds_after_burst"]
        row(f"overload: back to normal latency{short}", f"< {goals['overload_recovery_s']} s",
            "not within 30 s" if recovery is None else f"{recovery} s",
            recovery is not None and recovery < goals["overload_recovery_s"])  # fmt: skip
    faults = sections.get("faults")
    if faults:
        tried = [f for f in faults["start_up"] if "skipped" not in f]
        good = [f for f in tried if f["one_line"] and f["exit_code"] and not f["ever_ready"]]
        row("start-up faults: non-zero exit, one line, never ready", "all", f"{len(good)} of {len(tried)}",
            len(good) == len(tried))  # fmt: skip
        failure = faults["inference_failure"]
        ok = (
            failure["failed_status"] == 500
            and failure["next_batch_status"] == 200
            and failure["failures_counted"]
        )
        row("failing model run: 500 + error id, next batch served, counted", "yes",
            f"{failure['failed_status']}, then {failure['next_batch_status']}, counted {failure['failures_counted']}",
            bool(ok))  # fmt: skip
        sigterm = faults["sigterm_under_load"]
        row("SIGTERM under load: accepted requests lost", "0", str(sigterm["accepted_lost"]),
            sigterm["accepted_lost"] == 0 and sigterm["exit_code"] == 0)  # fmt: skip
    return rows


def malformed_lines(section: dict) -> list[str]:
    protocol = section["protocol"]
    memory = section["server_memory_mib"]
    lines = [
        "## Malformed and hostile uploads",
        "",
        _run_line(section),
        "",
        f"{protocol['uploads']:,} requests in {protocol['rounds']} rounds of `{protocol['generator']}` "
        f"(seeds {protocol['seeds'][0]}-{protocol['seeds'][1]}), "
        + ("one at a time" if protocol["concurrency"] == 1 else f"{protocol['concurrency']} clients at once")
        + ", "
        f"against one server with the default limits ({protocol['limits']['max_upload_bytes']:,} bytes, "
        f"{protocol['limits']['max_image_pixels']:,} pixels, {protocol['limits']['max_images_per_request']} "
        f"images per request); {section['seconds']:.0f} s in all.",
        "",
        *_fuzz_lines(section.get("decoder_fuzz")),
        f"- Statuses: {', '.join(f'{k}: {v:,}' for k, v in sorted(section['statuses'].items()))}.",
        f"- Server errors (5xx): {section['server_errors_5xx']}; crashes: {len(section['crashes'])}; "
        f"transport errors: {section['transport_errors']}; statuses outside the case's accepted set: "
        f"{section['unexpected_status']}; answers showing internals: {section['answers_showing_internals']}; "
        f"tracebacks in the server log: {section['tracebacks_in_server_log']}; 200 answers lacking the bad "
        f"image's per-image error: {section.get('per_image_errors_missing', '-')}.",
        f"- Latency of the {section['rejection_latency_ms'].get('count', 0):,} rejections (4xx), client to "
        f"client: p50 {_ms(section['rejection_latency_ms'], 'p50')} ms, p99 "
        f"{_ms(section['rejection_latency_ms'], 'p99')} ms, max {_ms(section['rejection_latency_ms'], 'max')} ms "
        f"({section['rejections_over_100ms']} over 100 ms). Accepted (200, the good image of a pair "
        f"included): p50 {_ms(section['accepted_latency_ms'], 'p50')} ms, p99 "
        f"{_ms(section['accepted_latency_ms'], 'p99')} ms.",
        f"- Server memory: resident {memory['before']['rss']} MiB before, {memory['after']['rss']} MiB after; "
        f"peak resident {memory['after']['peak']} MiB (the at-limit images: a {protocol['limits']['max_upload_bytes']:,}"
        f"-byte body, a {protocol['limits']['max_image_pixels']:,}-pixel image, are accepted by design).",
        "",
        "Slowest rejections: "
        + "; ".join(
            f"{r['kind']} ({r['note']}) {r['status']} in {r['ms']} ms"
            for r in section["slowest_rejections"][:5]
        )
        + ".",
        "",
        "Each image kind is sent alone, beside a good image and as a raw body, so a kind that is always "
        "refused still shows 200s: the answers to the pair, where the bad image gets its own error. "
        "Latencies are client to client, accepted requests included (a valid strip of 25 million pixels "
        "takes a while).",
        "",
        "| kind | sent | statuses | outside accepted set | p99 ms | max ms |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for kind, row in section["by_kind"].items():
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(row["statuses"].items()))
        lines.append(
            f"| {kind} | {row['sent']} | {statuses} | {row['unexpected']} | {row['p99_ms']} | {row['max_ms']} |"
        )
    return lines


def _fuzz_lines(fuzz: dict | None) -> list[str]:
    if not fuzz:
        return []
    outcomes = ", ".join(f"{k}: {v:,}" for k, v in sorted(fuzz["outcomes"].items()))
    shown = "; ".join(fuzz["other_exception_examples"][:3])
    return [
        f"- Decoder fuzz first (in-process, hypothesis, `fuzz_inputs()` of the generator, seed {fuzz['seed']}): "
        f"{fuzz['inputs']:,} inputs in {fuzz['seconds']:g} s; outcomes {outcomes}; exceptions other than a "
        f"rejection: {fuzz['other_exceptions']}{' (' + shown + ')' if shown else ''}; slowest input "
        f"{fuzz['slowest_ms']} ms.",
    ]


def _short_warning(protocol: dict, flag: str, full: str) -> list[str]:
    if protocol["full_length"]:
        return []
    return [
        f"> **Short run** ({flag} {protocol['seconds']:g}): it checks the harness, it is not the "
        f"measurement. The measurement is `{COMMAND} --modes {full}` ({'10 min' if full == 'soak' else '60 s'}"
        " at full length), on a quiet machine.",
        "",
    ]


def soak_lines(section: dict) -> list[str]:
    protocol, saturated = section["protocol"], section["saturation"]
    rss = section["rss_mib"]
    first, last = section["latency_first_window_ms"], section["latency_last_window_ms"]
    return [
        "## Soak",
        "",
        _run_line(section),
        "",
        *_short_warning(protocol, "--soak-seconds", "soak"),
        f"Saturation first: {saturated['requests_per_s']} requests/s ({saturated['images_per_s']} images/s, "
        f"{saturated['clients']} clients back to back, {protocol['images_per_request']} images per request). "
        f"Then an open loop at {protocol['load']:.0%} of it ({protocol['rate_rps']} requests/s) for "
        f"{protocol['seconds']:g} s over {protocol['connections']} connections, every score checked against the "
        "graph run outside the server.",
        "",
        f"- Requests: {section['requests']:,}; errors: {section['errors']} ({section['statuses']}); scores "
        f"correct {section['scores_correct']:,}, wrong {section['scores_wrong']}.",
        f"- Resident memory: {rss['after_warm_up']} MiB after {protocol['warm_up_s']:g} s of warm-up, "
        f"{rss['at_end']} MiB at the end: {rss['growth']:+.1%}.",
        f"- Latency, first {protocol['window_s']:g} s: p50 {_ms(first, 'p50')}, p95 {_ms(first, 'p95')}, "
        f"p99 {_ms(first, 'p99')} ms; last {protocol['window_s']:g} s: p50 {_ms(last, 'p50')}, "
        f"p95 {_ms(last, 'p95')}, p99 {_ms(last, 'p99')} ms.",
        f"- Generator lag p99 {_ms(section['generator_lag_ms'], 'p99')} ms (how late requests left: large "
        "values mean the load generator, not the server, set the pace).",
    ]


def overload_lines(section: dict) -> list[str]:
    protocol, saturated = section["protocol"], section["saturation"]
    recovery = section["recovery"]
    accepted = section["latency_ms"]
    return [
        "## Overload",
        "",
        _run_line(section),
        "",
        *_short_warning(protocol, "--overload-seconds", "overload"),
        f"Saturation first: {saturated['requests_per_s']} requests/s. Then {protocol['factor']:g}x that "
        f"({protocol['rate_rps']} requests/s offered, {section['sent_rps']} sent) for {protocol['seconds']:g} s "
        f"over {protocol['connections']} connections; the server queues at most {protocol['max_queue_images']} "
        f"images ({protocol['images_per_request']} per request).",
        "",
        f"- Statuses: {section['statuses']}; other than 200/503: {section['other_statuses']}.",
        f"- Refused with 503: {section['refused_503']:,}, {section['refused_with_retry_after']:,} of them with "
        f"Retry-After; refusal latency p50 {_ms(section['refusal_latency_ms'], 'p50')} ms, p99 "
        f"{_ms(section['refusal_latency_ms'], 'p99')} ms, max {_ms(section['refusal_latency_ms'], 'max')} ms "
        f"(server side of it, from the request leaving: p99 {_ms(section['refusal_service_ms'], 'p99')} ms).",
        f"- Accepted: {section['accepted']:,}, scores correct {section['scores_correct']:,}, wrong "
        f"{section['scores_wrong']}; latency p50 {_ms(accepted, 'p50')} ms, p99 {_ms(accepted, 'p99')} ms "
        "(the bounded queue's wait).",
        f"- Back to normal ({recovery['rule']}; normal is {recovery['normal_ms']} ms, from an idle p99 of "
        f"{_ms(section['baseline_latency_ms'], 'p99')} ms): "
        + (
            "not within 30 s."
            if recovery["seconds_after_burst"] is None
            else f"{recovery['seconds_after_burst']} s after the burst."
        ),
        f"- Generator lag p99 {_ms(section['generator_lag_ms'], 'p99')} ms; the last request due in the "
        f"burst left {section['last_burst_request_left_s_after_window']} s after its window (a generator "
        "that falls behind stretches the burst, and the recovery is counted from the window's end).",
    ]


def faults_lines(section: dict) -> list[str]:
    lines = [
        "## Faults",
        "",
        _run_line(section),
        "",
        "| start-up fault | exit status | ever ready | seconds | the line |",
        "|---|---:|---|---:|---|",
    ]
    for fault in section["start_up"]:
        if "skipped" in fault:
            lines.append(f"| {fault['fault']} | - | - | - | skipped: {fault['skipped']} |")
            continue
        line = " / ".join(fault["lines"]).replace("|", "\\|")
        lines.append(
            f"| {fault['fault']} | {fault['exit_code']} | {fault['ever_ready']} | {fault['seconds_to_exit']} | {line} |"
        )
    failure, sigterm = section["inference_failure"], section["sigterm_under_load"]
    lines += [
        "",
        f"- A model run that fails (injected in-process): {failure['failed_status']} `{failure['failed_code']}` "
        f"with an error id ({failure['error_id_in_answer']}); the next batch {failure['next_batch_status']}; "
        f"`dede_inference_failures_total` {failure['failures_counted']}.",
        f"- SIGTERM after 3 s of {sigterm['clients']} clients sending {sigterm['images_per_request']} images per "
        f"request: {sigterm['requests']:,} requests, {sigterm['answered_200']:,} answered 200 "
        f"({sigterm['answered_200_after_signal']} of them after the signal), {sigterm['refused_503']} refused "
        f"503 while draining, accepted requests lost {sigterm['accepted_lost']}, wrong scores "
        f"{sigterm['wrong_scores']}; exit status {sigterm['exit_code']} after {sigterm['seconds_to_exit']} s "
        f"(drain timeout {sigterm['drain_timeout_s']} s).",
    ]
    return lines


def write_report(results: dict, out_dir: Path) -> None:
    bundle = results["bundle"]
    sections = results["sections"]
    lines = [
        "# Reliability benchmark",
        "",
        f"Made by `{COMMAND}`; each section below names the command, commit and machine that produced it, "
        "and every figure is read from `results.json` beside this file.",
        "",
    ]
    if results.get("note"):
        lines += [f"> **Note:** {results['note']}", ""]
    lines += [
        f"- Bundle: {bundle['model_name']} {bundle['model_version']} ({bundle['encoder']}, input "
        f"{bundle['input'][0]}x{bundle['input'][1]}), from {bundle['path']}.",
        "",
        "## Goals",
        "",
        *goals_table(results),
        "",
    ]
    writers = {"malformed": malformed_lines, "soak": soak_lines, "overload": overload_lines}
    writers["faults"] = faults_lines
    for mode, writer in writers.items():
        if mode in sections:
            lines += [*writer(sections[mode]), ""]
        else:
            lines += [f"## {mode.capitalize()}", "", f"Not run yet: `{COMMAND} --modes {mode}`.", ""]
    costly = out_dir / "costly.json"  # benchmarks/reliability/costly.py, a run of its own
    if costly.is_file():
        from benchmarks.reliability.costly_report import costly_lines

        lines += [*costly_lines(json.loads(costly.read_text())), ""]
    else:
        lines += ["## Costly structure", "", "Not run yet: `python -m benchmarks.reliability.costly`.", ""]
    (out_dir / "REPORT.md").write_text("\n".join(lines))


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    write_report(json.loads((folder / "results.json").read_text()), folder)
