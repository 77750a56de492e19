"""`dede fit` under torchrun: two CPU processes (gloo) fit the decoder one process fits, rank 0 alone
writes the run directory, and a killed two-process fit resumes from rank 0's checkpoint."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.cli import main as dede
from training.distributed import Distributed

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_fit_worker.py")
STEPS, EVAL_EVERY = 200, 100  # the CLI validates (and checkpoints) every 100 steps


def _fit_argv(data: Path, out: Path) -> list[str]:
    return [
        "fit",
        "--encoder",
        "random:cifar_resnet18",
        "--width",
        "8",
        "--data",
        str(data),
        "--preset",
        "tiny",
        "--max-steps",
        str(STEPS),
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]


def _torchrun(
    record: Path, crash_after: int, argv: list[str], timeout: float = 300
) -> subprocess.CompletedProcess:
    record.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*command, str(WORKER), str(record), str(crash_after), *argv],
        env=env,
        cwd=record,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _writes(record: Path, rank: int) -> list[str]:
    lines = (record / f"writes-rank{rank}.txt").read_text().splitlines()
    assert lines[0] == "started"  # the rank ran with its audit hook
    return lines[1:]


def _log(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv") as handle:
        return list(csv.DictReader(handle))


def test_shards_split_a_batch_disjointly_in_rank_order() -> None:
    for world, n in [(2, 32), (3, 32), (4, 5), (8, 128)]:
        shards = [Distributed(world_size=world, rank=r).shard(n) for r in range(world)]
        covered = [i for s in shards for i in range(n)[s]]
        assert covered == list(range(n))  # disjoint, in rank order, nothing left out
        sizes = [s.stop - s.start for s in shards]
        assert max(sizes) - min(sizes) <= 1
        assert Distributed(world_size=world).shard_sizes(n) == sizes


def test_without_a_launcher_the_fit_is_single_process(monkeypatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    alone = Distributed.from_environment("cpu")
    assert not alone.enabled and alone.is_main and not torch.distributed.is_initialized()
    assert alone.broadcast({"a": 1}) == {"a": 1} and alone.sum(1.5, 2.0) == [1.5, 2.0]
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1: nothing to distribute
    assert not Distributed.from_environment("cpu").enabled


def _assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal within float noise, but for the attention's key bias: softmax ignores a shift that is
    the same for every key of a query, so that bias's gradient is zero but for rounding, and Adam
    scales rounding noise up to full steps (one element moved 1.2e-4 apart on one CPU). It does not
    change any output, so it is left out."""
    for name, weight in expected.items():
        if name.endswith("attn.in_proj_bias"):
            dim = len(weight) // 3
            keep = torch.cat([torch.arange(dim), torch.arange(2 * dim, 3 * dim)])
            got_w, weight = got[name][keep], weight[keep]
        else:
            got_w = got[name]
        torch.testing.assert_close(got_w, weight, rtol=1e-3, atol=1e-4, msg=name)


def test_two_process_fit_matches_one_process_and_resumes(tiny_data: dict[str, Path], tmp_path: Path) -> None:
    # The reference: the same command in this one process.
    single = tmp_path / "single"
    assert dede(_fit_argv(tiny_data["aux"], single)) == 0

    # Two processes, killed after 150 of the 200 steps: rank 0 checkpointed at step 100.
    run_dir, record = tmp_path / "two", tmp_path / "record-killed"
    killed = _torchrun(record, 151, _fit_argv(tiny_data["aux"], run_dir))
    assert killed.returncode != 0, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["progress"]["step"] == EVAL_EVERY
    shutil.copy(run_dir / "checkpoint.pt", tmp_path / "killed-checkpoint.pt")
    assert not (run_dir / "decoder.safetensors").exists()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "fitting"
    assert info["fit"]["distributed"] == {"world_size": 2, "backend": "gloo", "per_rank_batch": [16, 16]}
    assert _writes(record, 1) == []  # rank 1 wrote nothing in the run directory
    rank0 = _writes(record, 0)
    assert {"os.mkdir two", "os.rename run.json", "open embeddings.npy", "open log.csv"} <= set(rank0)
    assert rank0.count("os.rename checkpoint.pt") == 1  # one validation, one checkpoint, one writer

    # The same command again resumes both processes from rank 0's checkpoint and finishes.
    record = tmp_path / "record-resumed"
    resumed = _torchrun(record, 0, _fit_argv(tiny_data["aux"], run_dir))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("fitted decoder:") == 1  # rank 0 reports, once
    assert _writes(record, 1) == []
    assert {"os.rename run.json", "os.rename checkpoint.pt", "open log.csv"} <= set(_writes(record, 0))
    assert json.loads((run_dir / "run.json").read_text())["status"] == "fitted"
    assert [row["step"] for row in _log(run_dir)] == ["100", "200"]  # each validation logged once

    # Same global batch, same steps: the same images in the same order, the gradient of the same
    # mean; only the order of float sums differs. The goal is validation loss within 2%;
    # the fit itself is far closer than that, so hold it to float noise.
    one, two = _log(single), _log(run_dir)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        ratio = float(b["val_loss_test_mask"]) / float(a["val_loss_test_mask"])
        assert abs(ratio - 1) < 1e-3, (a, b)
        # the train loss averages the ranks' shards back into the global batch's
        assert abs(float(b["train_loss"]) / float(a["train_loss"]) - 1) < 1e-3, (a, b)
    a, b = load_file(str(single / "decoder.safetensors")), load_file(str(run_dir / "decoder.safetensors"))
    assert a.keys() == b.keys()
    _assert_same_weights(b, a)
    last_one, last_two, halfway = (
        torch.load(path, weights_only=True)["decoder"]
        for path in (single / "checkpoint.pt", run_dir / "checkpoint.pt", tmp_path / "killed-checkpoint.pt")
    )
    _assert_same_weights(last_two, last_one)  # the weights of the last step, whichever validation was best
    # The tolerance tells one fit's steps apart: the last 100 steps moved the weights beyond it.
    assert any(not torch.allclose(halfway[k], last_one[k], rtol=1e-3, atol=1e-4) for k in last_one)


def test_a_mismatched_run_stops_every_process(tiny_data: dict[str, Path], tmp_path: Path) -> None:
    """Rank 0 finds that the run directory holds another decoder: every rank stops with the error
    (a rank left behind would wait for the others forever)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"decoder_config": {}, "encoder": {}, "status": "fitting"}))
    result = _torchrun(tmp_path / "record", 0, _fit_argv(tiny_data["aux"], run_dir), timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("holds a run with another encoder or decoder config") == 2, result.stderr[
        -3000:
    ]
    assert set(_writes(tmp_path / "record", 0)) <= {"os.mkdir run"}  # (mkdir of an existing folder)
    assert _writes(tmp_path / "record", 1) == []
