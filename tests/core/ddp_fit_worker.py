"""One process of a `torchrun` launch in test_distributed_fit.py: `dede fit` (training.cli.main)
with two test hooks.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/core/ddp_fit_worker.py \
        RECORD_DIR CRASH_AFTER fit --encoder ... --out RUN_DIR

- every file this rank creates, writes, renames or removes under RUN_DIR (Python's audit events:
  open for writing, os.rename/replace, os.remove, os.mkdir) is appended, as it happens, to
  RECORD_DIR/writes-rank{RANK}.txt, after a first line `started`;
- CRASH_AFTER > 0: the fit's training loss raises KeyboardInterrupt at that call on every rank
  (a killed run, as in test_pipeline's resume test); the CLI then exits 130.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _out_dir(argv: list[str]) -> Path:
    return Path(argv[argv.index("--out") + 1]).resolve()


def main() -> int:
    record_dir, crash_after, argv = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    watched = _out_dir(argv)
    record = open(record_dir / f"writes-rank{os.environ['RANK']}.txt", "w", buffering=1)  # noqa: SIM115
    record.write("started\n")

    def under_run_dir(path: object) -> str | None:
        if isinstance(path, bytes | str | os.PathLike):
            resolved = Path(os.fsdecode(path)).resolve()
            if resolved == watched or watched in resolved.parents:
                return resolved.name
        return None

    def audit(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            name = under_run_dir(path) if writing else None
        elif event in ("os.rename", "os.remove", "os.mkdir"):
            name = under_run_dir(args[0 if event != "os.rename" else 1])
        else:
            return
        if name is not None:
            record.write(f"{event} {name}\n")

    sys.addaudithook(audit)

    import training.fit as fit_module
    from training.cli import main as dede

    if crash_after > 0:
        real_loss, calls = fit_module.training_loss, {"n": 0}

        def crash(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls["n"] += 1
            if calls["n"] >= crash_after:
                raise KeyboardInterrupt
            return real_loss(*args, **kwargs)

        fit_module.training_loss = crash
    return dede(argv)


if __name__ == "__main__":
    sys.exit(main())
