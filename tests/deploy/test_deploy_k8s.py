"""Kubernetes manifests (docker/k8s/), validated offline.

Core kinds: against the Kubernetes OpenAPI schemas bundled in the kubernetes-validate package
(strict: an unknown or misspelt field fails), when it is installed. The PodMonitor (a Prometheus
Operator CRD, for which that package has no schema) and the links between resources (selectors,
port names, probe paths, drain timing) are checked by hand, always.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S = REPO_ROOT / "docker" / "k8s"
KUBERNETES_VERSION = "1.30.0"


def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted([*K8S.glob("*.yaml"), *K8S.glob("gpu/*.yaml")]):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((str(path.relative_to(K8S)), document))
    return found


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def pod_labels() -> list[dict[str, str]]:
    return [d["spec"]["template"]["metadata"]["labels"] for d in of_kind("Deployment")]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_kind_the_issue_asks_for_is_there() -> None:
    kinds = {doc["kind"] for _, doc in manifests()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "PodMonitor"} <= kinds
    gpu = [d for d in of_kind("Deployment") if "nvidia.com/gpu" in str(d)]
    assert gpu, "a GPU variant of the Deployment"
    container = gpu[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_core_kinds_validate_against_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed"
    )
    checked = 0
    for name, document in manifests():
        if document["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # a CRD: checked in test_pod_monitor_scrapes_every_detector_pod
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{name} ({document['kind']}): {exc.message}") from exc
        checked += 1
    assert checked >= 6


def test_the_validator_rejects_a_misspelt_field() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed"
    )
    broken = copy.deepcopy(of_kind("Deployment")[0])
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readynessProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("deployment", of_kind("Deployment"), ids=lambda d: d["metadata"]["name"])
def test_deployment_probes_resources_security_and_drain(deployment: dict) -> None:
    spec = deployment["spec"]
    assert selects(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["limits"]["cpu"] and resources["limits"]["memory"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/bundles"]["readOnly"] is True and "/tmp" in mounts
    env = {e["name"]: e for e in container["env"]}
    assert "value" not in env["DEDE_API_KEY"], "the API key comes from a Secret"
    assert env["DEDE_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(env["DEDE_DRAIN_TIMEOUT_S"]["value"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def test_service_pdb_and_hpa_point_at_the_deployments() -> None:
    deployments = {d["metadata"]["name"]: d for d in of_kind("Deployment")}
    (service,) = of_kind("Service")
    assert all(selects(service["spec"]["selector"], labels) for labels in pod_labels())
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    (pdb,) = of_kind("PodDisruptionBudget")
    assert all(selects(pdb["spec"]["selector"]["matchLabels"], labels) for labels in pod_labels())
    hpas = of_kind("HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == deployments.keys()
    for hpa in hpas:
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_pod_monitor_scrapes_every_detector_pod() -> None:
    (monitor,) = of_kind("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"}
    assert all(selects(monitor["spec"]["selector"]["matchLabels"], labels) for labels in pod_labels())
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
