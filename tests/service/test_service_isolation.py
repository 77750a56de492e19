"""The service imports no torch, torchvision or training code: the serving image holds none of them."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT


def test_importing_the_whole_service_loads_no_torch_nor_training() -> None:
    probe = (
        "import sys\n"
        "import service, service.main, service.app, service.api, service.batcher, service.decoding, "
        "service.runtime, service.metrics, service.settings, service.uploads, service.middleware\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'torchvision', 'training'})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "", f"service pulled in: {result.stdout.strip()}"


def test_the_settings_module_is_light_enough_for_a_cli_to_import() -> None:
    probe = (
        "import sys, argparse\n"
        "from service.settings import add_settings_arguments\n"
        "add_settings_arguments(argparse.ArgumentParser())\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'onnxruntime', 'fastapi', 'uvicorn', 'PIL'})\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "", f"service.settings pulled in: {result.stdout.strip()}"
