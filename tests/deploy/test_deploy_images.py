"""The images and the compose file, read as files: what must hold without building anything.
(docker/smoke.sh builds and runs them for real: tests/deploy/test_deploy_smoke.py.)"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER = REPO_ROOT / "docker"


def load_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"docker_{name}", DOCKER / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


entrypoint = load_module("entrypoint")
requirements = load_module("requirements")


def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


def env_of(service: dict) -> dict[str, str | None]:
    return dict((item.split("=", 1) + [None])[:2] for item in service.get("environment", []))


# -- requirements and entrypoint ----------------------------------------------------------------


def test_serving_requirements_come_from_pyproject_without_torch() -> None:
    cpu = requirements.serving_requirements(REPO_ROOT / "pyproject.toml", cpu=True)
    names = {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in cpu}
    assert {"onnxruntime", "fastapi", "uvicorn", "numpy", "pydantic", "prometheus-client"} <= names
    assert "onnxruntime-gpu" not in names
    assert not names & {"torch", "torchvision", "onnx", "onnxscript"}
    gpu = requirements.serving_requirements(
        REPO_ROOT / "pyproject.toml", cpu=False, onnxruntime_version="1.31.1"
    )
    assert "onnxruntime-gpu==1.31.1" in gpu


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_limit_v1_and_v2(tmp_path: Path, files: dict[str, str], expected: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert entrypoint.cgroup_cpu_limit(tmp_path) == expected


def test_threads_follow_the_quota_not_the_host(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # --cpus 1.5 -> 2 whole CPUs at most
    cpus = entrypoint.usable_cpus(tmp_path)
    assert 1 <= cpus <= 2
    assert entrypoint.thread_settings(2) == {
        "DEDE_WORKERS": "1",
        "DEDE_INTRA_OP_THREADS": "2",
        "DEDE_DECODE_THREADS": "2",
    }
    assert entrypoint.thread_settings(16)["DEDE_DECODE_THREADS"] == "4"
    # Several workers share the CPUs: threads are per worker.
    assert entrypoint.thread_settings(16, workers=8)["DEDE_INTRA_OP_THREADS"] == "2"
    # The service's auto rule on the usable CPUs (not the host's): CUDA when the providers name it.
    assert entrypoint.worker_count(1, {}) == 1
    assert entrypoint.worker_count(2, {}) == 2
    assert entrypoint.worker_count(8, {}) == 4
    assert entrypoint.worker_count(16, {"DEDE_EXECUTION_PROVIDERS": "cuda,cpu"}) == 8
    assert entrypoint.worker_count(16, {"DEDE_WORKERS": "3"}) == 3
    assert entrypoint.worker_count(16, {"DEDE_WORKERS": "0"}) == 8
    (tmp_path / "cpu.max").write_text("garbage")
    assert entrypoint.usable_cpus(tmp_path) >= 1  # a strange cgroup file never stops the service


# -- Dockerfiles ---------------------------------------------------------------------------------


def instructions(path: Path, stage: str | None = None) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined; only `stage` if given."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else None
        if stage is None or current == stage:
            result.append((word.upper(), rest.strip()))
    return result


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_serving_images_are_small_hardened_and_torch_free(dockerfile: str) -> None:
    path = DOCKER / dockerfile
    final = instructions(path, "serve")
    assert final, "the final stage must be named `serve`"
    assert instructions(path)[-len(final) :] == final, "`serve` must be the last (default) stage"
    users = [arg for word, arg in final if word == "USER"]
    assert users and users[-1] not in {"root", "0"}, "the service must not run as root"
    health = [arg for word, arg in final if word == "HEALTHCHECK"]
    assert health and "/healthz" in health[0]
    copies = " ".join(arg for word, arg in instructions(path) if word == "COPY")
    assert "training" not in copies and "models/encoders" not in copies, "only the torch-free half"
    assert not any("torch" in arg for _, arg in instructions(path)), f"{dockerfile} installs torch"
    # Multi-stage: pip and build leftovers stay in the first stage.
    assert sum(word == "FROM" for word, _ in instructions(path)) >= 2


def test_cpu_image_starts_from_python_slim_and_cuda_image_from_a_matching_cuda_base() -> None:
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in (DOCKER / "Dockerfile").read_text()
    cuda = (DOCKER / "Dockerfile.cuda").read_text()
    base = re.search(r"ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-", cuda)
    ort = re.search(r"ARG ONNXRUNTIME_VERSION=(\S+)", cuda)
    assert base and ort
    # onnxruntime-gpu 1.2x on PyPI targets CUDA 12; 1.31 and later target CUDA 13.
    minor = int(ort.group(1).split(".")[1])
    assert int(base.group(1)) == (13 if minor >= 31 else 12)


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", "bundles/*-work"} <= ignored


# -- compose -------------------------------------------------------------------------------------


def test_compose_services_and_profiles() -> None:
    services = compose()["services"]
    assert {"detector", "prometheus", "grafana"} <= services.keys()
    assert "profiles" not in services["detector"], "the CPU detector runs by default"
    assert services["detector-gpu"]["profiles"] == ["gpu"]
    assert services["trainer"]["profiles"] == ["trainer"]
    gpu = services["detector-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]


@pytest.mark.parametrize("name", ["detector", "detector-gpu"])
def test_detectors_are_hardened_and_drain_before_being_killed(name: str) -> None:
    service = compose()["services"][name]
    assert service["read_only"] is True and "ALL" in service["cap_drop"]
    assert any(t.startswith("/tmp") for t in service["tmpfs"])
    assert service["restart"] == "unless-stopped"
    assert service["volumes"][0].endswith(":/bundles:ro")
    grace = int(service["stop_grace_period"].rstrip("s"))
    assert grace > float(env_of(service)["DEDE_DRAIN_TIMEOUT_S"]) + 5
    assert "/readyz" in service["healthcheck"]["test"]
    limits = service["deploy"]["resources"]["limits"]
    assert limits["cpus"] and limits["memory"]


def test_depends_on_conditions_and_healthchecks() -> None:
    services = compose()["services"]
    assert services["prometheus"]["depends_on"]["detector"]["condition"] == "service_started"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in ("detector", "prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"], name


def test_no_secret_values_in_the_compose_file() -> None:
    for name, service in compose()["services"].items():
        for key, value in env_of(service).items():
            if re.search(r"KEY|PASSWORD|SECRET|TOKEN", key):
                assert value is None, f"{name}: {key} must pass through from the environment, not be set here"


def test_mounted_files_exist() -> None:
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./docker"):
                assert (REPO_ROOT / source).exists(), source
        build = service.get("build")
        if build:
            assert (REPO_ROOT / build["dockerfile"]).is_file()
