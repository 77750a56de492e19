"""The "Costly structure" section of benchmarks/reliability/REPORT.md, every figure read from the
costly.json that `python -m benchmarks.reliability.costly` writes (rendered by report.py)."""

from __future__ import annotations


def _ok(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _measured_by(part: dict, section: dict) -> list[str]:
    """A part measured by another command than the section's latest says so."""
    run = part.get("run")
    if not run or run == section["run"]:
        return []
    return [
        f"Measured by `{run['command']}` at {run['commit'][:12]}, load average at the end "
        f"{run.get('load_average')}.",
        "",
    ]


def costly_lines(section: dict) -> list[str]:
    """The "Costly structure" section of REPORT.md, every figure read from costly.json."""
    run, goals = section["run"], section["goals"]
    machine = run["machine"]
    lines = [
        "## Costly structure",
        "",
        f"`{run['command']}` at {run['commit'][:12]}{' (uncommitted changes)' if run.get('dirty') else ''}, "
        f"{machine['cpu']}, {machine['cores']} cores, load average at the end {run.get('load_average')}; "
        f"bundle: {section['bundle']}. {section.get('note', '')}",
        "",
    ]
    classes = section.get("classes")
    if classes:
        lines += _measured_by(classes, section)
        rows = classes["classes"].items()
        worst_wall = max(r["max_wall_s"] for _, r in rows)
        worst_cpu = max(r["max_server_cpu_s"] for _, r in rows)
        worst_after = max(r["max_cpu_after_answer_s"] for _, r in rows)
        lines += [
            f"Each file sent alone {classes['repeats']} times to a server with the default settings. "
            "Server CPU: the service process, its fork server and decode workers (killed workers included). "
            f"After: CPU in the second after the answer, less the idle rate ({classes['idle_cpu_per_s']} s/s). "
            "Pillow alone: the same file opened and loaded by Pillow with no checks, as b31f78f decoded it."
            + (
                f" A refusal is answered after DEDE_REFUSAL_DELAY_S ({section['refusal_delay_s']} s), a wait "
                "on a timer: its wall time includes the wait, its server CPU does not."
                if section.get("refusal_delay_s")
                else ""
            ),
            "",
            "| file | bytes | answer | wall s (max) | server CPU s (max) | CPU after answer s | Pillow alone |",
            "| --- | ---: | --- | ---: | ---: | ---: | --- |",
        ]
        for name, row in rows:
            pillow = row["pillow_alone"]
            alone = (
                f"{pillow['cpu_s']} CPU-s, {pillow['outcome']}"
                if pillow["cpu_s"] is not None
                else pillow["outcome"]
            )
            lines.append(
                f"| {name} | {row['bytes']:,} | {', '.join(row['statuses'])} | {row['max_wall_s']} | "
                f"{row['max_server_cpu_s']} | {row['max_cpu_after_answer_s']} | {alone} |"
            )
        lines += [
            "",
            f"- Every answer within {goals['answer_s']} s: worst {worst_wall} s, {_ok(worst_wall <= goals['answer_s'])}.",
            f"- Server work per upload <= {goals['server_cpu_s']} CPU-s: worst {worst_cpu}, "
            f"{_ok(worst_cpu <= goals['server_cpu_s'])}.",
            f"- No work after the answer (<= {goals['cpu_after_answer_s']} CPU-s in the next second): worst "
            f"{worst_after}, {_ok(worst_after <= goals['cpu_after_answer_s'])}.",
            "",
        ]
    fire = section.get("under_fire")
    if fire:
        lines += _measured_by(fire, section)
        idle = fire["idle"]
        lines += [
            f"Good requests ({fire['good_rate']} requests/s, open loop, {fire['seconds']} s a phase) alone, then "
            f"with {fire['hostile_clients']} clients sending costly uploads"
            + (
                " from a process of their own (the attacker's load generator off the good client's loop)"
                if fire.get("issue_classes_paced", {}).get("hostile_in")
                else " from the good client's own event loop"
            )
            + ": the issue's classes above (refused "
            "by their structure) one a second per client, then back to back (a flood of bodies up to 2.4 MB: "
            "what costs is receiving them), then the two files just inside the limits back to back (each "
            "keeps a decode worker busy up to its budget). Answers to the costly uploads in brackets"
            + (
                f"; each refusal held {section['refusal_delay_s']} s (DEDE_REFUSAL_DELAY_S), which bounds a "
                "client's refusals a second."
                if section.get("refusal_delay_s")
                else "."
            ),
            "",
            "| good requests | count | p50 ms | p99 ms | p99 / idle | wrong scores |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            f"| alone | {idle['ok']} | {idle['latency_ms']['p50']} | {idle['latency_ms']['p99']} | 1 | "
            f"{idle['wrong_scores']} |",
        ]
        labels = {
            "issue_classes_paced": "issue's classes, each client one a second",
            "issue_classes_back_to_back": "issue's classes, back to back",
            "at_limit_back_to_back": "at-limit files, back to back",
        }
        for phase, label in labels.items():
            if phase in fire:
                row = fire[phase]
                lines.append(
                    f"| {label} ({row['hostile_answers']}) | {row['ok']} | {row['latency_ms']['p50']} | "
                    f"{row['latency_ms']['p99']} | {row['p99_ratio']} | {row['wrong_scores']} |"
                )
        lines.append("")
        for phase in labels:
            if phase in fire:
                ratio = fire[phase]["p99_ratio"]
                lines.append(
                    f"- p99 within {goals['p99_ratio']}x of idle, {labels[phase]}: {ratio}x, "
                    f"{_ok(ratio <= goals['p99_ratio'])}."
                )
        lines.append("")
    throughput = section.get("throughput")
    if throughput:
        lines += _measured_by(throughput, section)
        medians = throughput["median_images_per_s"]
        lines += [
            f"Saturation throughput ({throughput['clients']} clients, closed loop, {throughput['images_per_request']} "
            f"images per request, {throughput['seconds']} s a turn), this commit and {section['base_ref']} up side by "
            f"side, measured in turns: this {throughput['images_per_s']['this']}, base "
            f"{throughput['images_per_s']['base']} images/s.",
            "",
            f"- Medians {medians['this']:.0f} vs {medians['base']:.0f} images/s: ratio {throughput['ratio']} "
            f"(goal >= {goals['throughput_ratio']}), {_ok(throughput['ratio'] >= goals['throughput_ratio'])}.",
        ]
        if "cpu_ratio" in throughput:
            cpu = throughput["median_server_cpu_ms_per_image"]
            lines.append(
                f"- Server CPU per image served (less swayed by load from elsewhere than throughput): "
                f"{cpu['this']} vs {cpu['base']} ms, ratio {throughput['cpu_ratio']}."
            )
        lines.append("")
    sigterm = section.get("sigterm")
    if sigterm:
        lines += _measured_by(sigterm, section)
        limit = sigterm["drain_timeout_s"] + goals["sigterm_extra_s"]
        lines += [
            f"SIGTERM with {sigterm['hostile_clients']} costly uploads in flight and {sigterm['good_clients']} good "
            f"clients: exit code {sigterm['exit_code']} after {sigterm['seconds_to_exit']} s (drain timeout "
            f"{sigterm['drain_timeout_s']:g} s); good requests sent before the signal: "
            f"{sigterm['good_sent_before_signal']}, {sigterm['good_answered_200']} answered 200, "
            f"{sigterm['good_refused_503']} refused 503, {sigterm['accepted_lost']} lost.",
            "",
            f"- Gone within drain timeout + {goals['sigterm_extra_s']:g} s: {_ok(sigterm['seconds_to_exit'] <= limit)}; "
            f"0 accepted good requests lost: {_ok(sigterm['accepted_lost'] == 0)}.",
            "",
        ]
    return lines
