"""Print the serving requirements from pyproject.toml, one per line, for `pip install -r -`.

The images install from this so that pyproject.toml stays the one list of dependencies.
`--cpu` swaps onnxruntime-gpu for the CPU-only onnxruntime wheel: the same `onnxruntime` module,
about 20 MB instead of 340 MB, which keeps the CPU image small.
`--onnxruntime-version V` pins the ONNX Runtime wheel (the CUDA image must match its CUDA base).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path


def serving_requirements(pyproject: Path, cpu: bool, onnxruntime_version: str | None = None) -> list[str]:
    """The base dependencies plus the `serve` extra, with the ONNX Runtime wheel chosen for the image."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["serve"]]
    chosen = []
    for requirement in requirements:
        name = re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower()
        if name in ("onnxruntime-gpu", "onnxruntime"):
            package = "onnxruntime" if cpu else "onnxruntime-gpu"
            spec = requirement[len(name) :]
            requirement = f"{package}=={onnxruntime_version}" if onnxruntime_version else package + spec
        chosen.append(requirement)
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path, nargs="?", default=Path("pyproject.toml"))
    parser.add_argument("--cpu", action="store_true", help="use the CPU-only onnxruntime wheel")
    parser.add_argument("--onnxruntime-version", help="pin the ONNX Runtime wheel to this version")
    args = parser.parse_args(argv)
    sys.stdout.write(
        "\n".join(serving_requirements(args.pyproject, args.cpu, args.onnxruntime_version)) + "\n"
    )


if __name__ == "__main__":
    main()
