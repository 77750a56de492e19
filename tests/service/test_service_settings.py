"""Settings: DEDE_* variables, comma lists, validation with clear messages, and the CLI flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.main import build_parser
from service.settings import Settings, describe_settings, settings_from_args


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in __import__("os").environ if n.startswith("DEDE_")]:
        monkeypatch.delenv(name)


def test_defaults_work_out_of_the_box() -> None:
    settings = Settings()
    assert settings.execution_providers == ["auto"]
    assert settings.api_key is None and settings.cors_origins == []
    assert settings.max_batch_size >= 1 and settings.max_batch_delay_ms > 0


def test_environment_variables_with_the_dede_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("DEDE_EXECUTION_PROVIDERS", "cuda, cpu")
    monkeypatch.setenv("DEDE_CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("DEDE_API_KEY", "s3cret")
    monkeypatch.setenv("DEDE_LOG_FORMAT", "json")
    settings = Settings()
    assert settings.max_batch_size == 8
    assert settings.execution_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.log_format == "json"


def test_an_empty_api_key_means_no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDE_API_KEY", "")
    assert Settings().api_key is None


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("DEDE_EXECUTION_PROVIDERS", "gpu", "unknown execution provider"),
        ("DEDE_EXECUTION_PROVIDERS", "auto,cpu", "cannot be combined"),
        ("DEDE_MAX_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("DEDE_LOG_FORMAT", "xml", "'text' or 'json'"),
    ],
)
def test_bad_values_are_refused_with_a_message(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=words):
        Settings()


def test_every_setting_is_described_and_has_a_flag() -> None:
    rows = describe_settings()
    assert {env for env, _, _ in rows} == {f"DEDE_{name.upper()}" for name in Settings.model_fields}
    assert all(description for _, _, description in rows)
    help_text = build_parser().format_help()
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in help_text


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDE_PORT", "9000")
    monkeypatch.setenv("DEDE_MAX_QUEUE", "7")
    parser = build_parser()
    settings = settings_from_args(
        parser.parse_args(["--port", "9100", "--execution-providers", "cpu"]), parser
    )
    assert settings.port == 9100 and settings.max_queue == 7
    assert settings.execution_providers == ["CPUExecutionProvider"]


def test_a_bad_flag_value_exits_with_a_usage_message_not_a_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--max-batch-size", "lots"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "max_batch_size" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_bundle_exits_with_one_clear_line(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--bundle", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "bundle not found" in result.stderr and "Traceback" not in result.stderr


def test_the_service_readme_lists_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[2] / "service" / "README.md").read_text()
    missing = [env for env, _, _ in describe_settings() if f"`{env}`" not in readme]
    assert not missing, f"service/README.md lacks {missing}"


def test_a_graph_that_cannot_serve_the_bundle_exits_with_one_clear_line(tmp_path: Path) -> None:
    import json

    from synthetic_bundle import make_synthetic_bundle

    from models.bundle import MANIFEST_NAME, write_manifest

    root = make_synthetic_bundle(tmp_path / "b")
    fields = json.loads((root / MANIFEST_NAME).read_text())
    fields.pop("files")
    fields["input"]["height"] = 64  # the graph takes 32x32
    write_manifest(root, fields)
    result = subprocess.run(
        [sys.executable, "-m", "service", "--bundle", str(root)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "manifest says" in result.stderr and "Traceback" not in result.stderr
