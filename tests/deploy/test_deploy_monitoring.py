"""Prometheus config and alert rules, Grafana provisioning and dashboard: structure, the datasource
uid, and every PromQL expression naming only metrics (and labels) the service really exports.

Grafana cannot be run where these tests were written (no registry holds its image there), so this is
what checks its files. The rules are also unit-tested by promtool (docker/prometheus/alerts_test.yml)
when promtool is on PATH here, and always by docker/smoke.sh inside the Prometheus image.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from service.metrics import Metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER = REPO_ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "dede.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "dede.yml"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
ALERTS = DOCKER / "prometheus" / "alerts.yml"

# Labels Prometheus itself attaches to every scraped series (job, instance; service by relabelling).
TARGET_LABELS = {"job", "instance", "service"}
# Series that are not the service's own but are fine to use: Prometheus's `up` and the standard
# process collector the service registers.
PROMQL_WORDS = {
    "sum", "by", "without", "rate", "increase", "irate", "histogram_quantile", "and", "or", "unless",
    "absent", "max_over_time", "avg_over_time", "count", "max", "min", "avg", "on", "ignoring",
    "label_values", "offset", "bool", "topk", "clamp_min",
}  # fmt: skip


def exported_series() -> dict[str, set[str]]:
    """Every series name the service exports -> its label names (histograms: _bucket/_sum/_count)."""
    metrics = Metrics(max_batch_size=32, threshold=1.0)
    labels = {
        wrapper._name: set(wrapper._labelnames)  # prometheus_client keeps label names only here
        for wrapper in vars(metrics).values()
        if isinstance(wrapper, MetricWrapperBase)
    }
    series: dict[str, set[str]] = {"up": set()}
    for family in metrics.registry.collect():  # also the process and platform collectors
        names = {
            "counter": [family.name + "_total"],
            "histogram": [family.name + s for s in ("_bucket", "_sum", "_count")],
        }.get(family.type, [family.name])
        for name in names:
            series[name] = labels.get(family.name, set()) | ({"le"} if name.endswith("_bucket") else set())
    return series


SERIES = exported_series()


def check_promql(expr: str, where: str, recorded: frozenset[str] = frozenset()) -> None:
    """Every metric name in `expr` is exported (or recorded by our rules); every label it filters
    or groups on exists on the metrics it uses."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values may contain anything
    expr = re.sub(r"\$\w+|\[[^\]]*\]", " ", expr)  # Grafana variables, range selectors
    used = []
    for token in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if token in PROMQL_WORDS or token in TARGET_LABELS or token == "le":
            continue
        if token.startswith(("dede_", "process_", "python_")) or token == "up":
            assert token in SERIES, f"{where}: `{token}` is not a metric the service exports"
            used.append(token)
        elif ":" in token:
            assert token in recorded, f"{where}: `{token}` is not a recording rule of alerts.yml"
    known_labels = set().union(*(SERIES[m] for m in used)) | TARGET_LABELS | {"le"}
    for selector in re.findall(r"\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
            assert label in known_labels, f"{where}: label `{label}` is on none of {used}"
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        for label in filter(None, (g.strip() for g in grouping.split(","))):
            assert label in known_labels, f"{where}: grouping label `{label}` is on none of {used}"


# -- Grafana -----------------------------------------------------------------------------------


def test_grafana_datasource_is_the_compose_prometheus_with_a_fixed_uid() -> None:
    config = yaml.safe_load(DATASOURCES.read_text())
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert source["uid"] == "dede-prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"  # the compose service name and port


def test_grafana_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./docker/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./docker/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        assert {"id", "type", "title", "gridPos", "targets", "datasource"} <= panel.keys(), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    # No two panels overlap on the grid.
    cells = [
        (x, y)
        for p in panels
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
        for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells)), "panels overlap"


def test_every_dashboard_query_uses_the_provisioned_datasource_and_real_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = 0
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "dede-prometheus"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "dede-prometheus", panel["title"]
            check_promql(target["expr"], f"panel '{panel['title']}'")
            queries += 1
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == "dede-prometheus"
        check_promql(variable["query"]["query"], f"variable {variable['name']}")
    assert queries >= 10


def test_dashboard_covers_what_an_operator_needs() -> None:
    """Request and image rate, flagged rate, latency quantiles from the histogram, queue wait vs
    compute, batch size, score distribution over time."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in panels}

    def panel_using(*needles: str) -> dict:
        for panel in panels:
            if all(n in exprs[panel["title"]] for n in needles):
                return panel
        raise AssertionError(f"no panel queries {needles}")

    panel_using("rate(dede_requests_total")
    panel_using("rate(dede_images_total")
    panel_using('outcome="flagged"', "rate(dede_images_total")
    latency = panel_using("histogram_quantile(0.99", "dede_request_duration_seconds_bucket")
    assert "histogram_quantile(0.5" in exprs[latency["title"]]
    panel_using("dede_queue_wait_seconds_bucket", "dede_batch_compute_seconds_bucket")
    panel_using("dede_batch_size")
    scores = panel_using("dede_score_bucket")
    assert scores["type"] == "heatmap" and scores["targets"][0]["format"] == "heatmap"


# -- Prometheus --------------------------------------------------------------------------------


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_prometheus_scrapes_the_detector_and_loads_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == [
        "/etc/prometheus/dede/alerts.yml"
    ]  # where compose mounts docker/prometheus
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "dede"]
    assert job["metrics_path"] == "/metrics"
    names = job["dns_sd_configs"][0]["names"]
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert set(names) <= set(compose["services"]), "scrape names must be compose service names"
    assert job["dns_sd_configs"][0]["port"] == 8000


def test_alert_rules_cover_the_failure_modes_and_use_real_metrics() -> None:
    rules = alert_rules()
    recorded = frozenset(r["record"] for r in rules if "record" in r)
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert {
        "DedeDetectorDown",
        "DedeLatencyP99High",
        "DedeFlagRateSpike",
        "DedeQueueFull",
        "DedeQueueSaturating",
    } <= alerts.keys()
    for rule in rules:
        check_promql(rule["expr"], rule.get("alert") or rule["record"], recorded)
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in {"critical", "warning"}, name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], name
        assert "for" in alert, f"{name}: alerts without `for` fire on a single bad scrape"
    # The spike is judged against the recent baseline, not a fixed number.
    assert "rate6h" in alerts["DedeFlagRateSpike"]["expr"]


def test_the_rule_unit_tests_name_only_existing_alerts() -> None:
    tests = yaml.safe_load((DOCKER / "prometheus" / "alerts_test.yml").read_text())
    names = {r.get("alert") for r in alert_rules()}
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert tested <= names
    assert {"DedeDetectorDown", "DedeFlagRateSpike", "DedeLatencyP99High", "DedeQueueFull"} <= tested


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (smoke.sh runs it)")
def test_promtool_accepts_the_config_and_the_rule_unit_tests_pass() -> None:
    folder = DOCKER / "prometheus"
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        result = subprocess.run(["promtool", *args], cwd=folder, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_check_promql_catches_a_wrong_metric_or_label() -> None:
    with pytest.raises(AssertionError, match="not a metric"):
        check_promql("rate(dede_image_total[5m])", "typo")
    with pytest.raises(AssertionError, match="label `result`"):
        check_promql('rate(dede_images_total{result="flagged"}[5m])', "wrong label")
    with pytest.raises(AssertionError, match="grouping label"):
        check_promql("sum by (status) (rate(dede_images_total[5m]))", "wrong grouping")
