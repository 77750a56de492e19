"""The demo build's stage times: a rebuild over stages a previous build left keeps their times."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest


def _fake_stages(monkeypatch: pytest.MonkeyPatch, seconds: dict[str, float]) -> None:
    """Every stage of lab.demo.build_demo_bundle replaced by one that writes its output and takes
    seconds[stage] when its output is not there yet (and no time when it is, as a resumed stage)."""
    import lab.attacks.badencoder
    import lab.demo
    import lab.ssl
    import models.encoders
    import training.calibrate
    import training.export
    import training.fit

    def stage(name: str, output: Path) -> Path:
        if not output.exists():
            time.sleep(seconds[name])
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_bytes(b"stage output")
        return output

    x = np.zeros((40, 32, 32, 3), np.uint8)
    y = np.arange(40) % 10
    monkeypatch.setattr(lab.demo, "_cifar10", lambda: (x, y, x, y))
    monkeypatch.setattr(lab.demo, "demo_splits", lambda n_train, n_test: {
        "shadow": np.arange(4), "fit": np.arange(4, 8), "calibration": np.arange(8), "evaluation": np.arange(8, 40)})  # fmt: skip
    monkeypatch.setattr(lab.demo, "_sample_index", lambda *args: 0)
    monkeypatch.setattr(
        lab.ssl, "pretrain_simclr", lambda x, out, **kw: stage("simclr", out / "encoder.safetensors")
    )
    monkeypatch.setattr(
        lab.attacks.badencoder,
        "backdoor_encoder",
        lambda clean, shadow, reference, trigger, out, settings: stage(
            "backdoor", out / "encoder.safetensors"
        ),
    )
    monkeypatch.setattr(models.encoders, "load_encoder", lambda path: object())
    monkeypatch.setattr(
        training.fit, "fit_decoder", lambda enc, aux, out, settings: stage("fit", out / "decoder.safetensors")
    )
    monkeypatch.setattr(training.fit, "load_run", lambda path: path)
    monkeypatch.setattr(training.calibrate, "calibrate_run", lambda *args, **kw: None)
    monkeypatch.setattr(
        training.export, "export_bundle", lambda run, out, **kw: stage("export", out / "manifest.json")
    )


def test_a_rebuild_keeps_the_times_of_the_stages_it_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lab.demo import build_demo_bundle

    _fake_stages(monkeypatch, {"simclr": 0.3, "backdoor": 0.2, "fit": 0.1, "export": 0.0})
    out = tmp_path / "demo"
    build_demo_bundle(out)
    first = json.loads((tmp_path / "demo-work" / "timings.json").read_text())
    assert first["simclr"] >= 0.3 and first["backdoor"] >= 0.2 and first["fit"] >= 0.1

    # The backdoor stage is redone (its output removed); SimCLR and the fit are reused.
    (tmp_path / "demo-work" / "badencoder" / "encoder.safetensors").unlink()
    _fake_stages(monkeypatch, {"simclr": 0.0, "backdoor": 0.5, "fit": 0.0, "export": 0.0})
    build_demo_bundle(out, rebuild=True)
    second = json.loads((tmp_path / "demo-work" / "timings.json").read_text())
    assert second["simclr"] == first["simclr"] and second["fit"] == first["fit"]
    assert second["backdoor"] >= 0.5
