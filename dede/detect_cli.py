"""`dede detect URL FILES...`: score image files with a running service (the client; no torch)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import httpx

from dede.client import Client, DedeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dede detect", description="score image files with a running dede service"
    )
    parser.add_argument("url", help="the service, e.g. http://localhost:8000")
    parser.add_argument("files", nargs="+", help="image files")
    parser.add_argument(
        "--api-key", default=os.environ.get("DEDE_API_KEY"), help="the service's key (default: $DEDE_API_KEY)"
    )
    parser.add_argument("--format", default="table", choices=["table", "jsonl"])
    parser.add_argument("--explain", action="store_true", help="jsonl: add each image's explanation")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    return parser


def run(argv: list[str]) -> int:
    """0: every image scored; 1: some image could not be; 2: the service refused or is unreachable."""
    args = build_parser().parse_args(argv)
    try:
        with Client(args.url, api_key=args.api_key, timeout_s=args.timeout) as client:
            result = client.detect(args.files, explain=args.explain)
    except (DedeError, httpx.HTTPError, OSError) as exc:
        print(f"dede detect: error: {exc}", file=sys.stderr)
        return 2
    if args.format == "jsonl":
        for image, path in zip(result.images, args.files, strict=True):
            row = {"path": path, "score": image.score, "flagged": image.flagged}
            row["error"] = image.error.message if image.error else None
            if image.explanation is not None:
                row["explanation"] = image.explanation
            print(json.dumps(row))
    else:
        width = max(len(path) for path in args.files)
        print(f"{'path':<{width}}  {'score':>12}  flagged   (threshold {result.threshold:.6g})")
        for image, path in zip(result.images, args.files, strict=True):
            score = "error" if image.score is None else f"{image.score:12.6g}"
            print(f"{path:<{width}}  {score:>12}  {image.error.message if image.error else image.flagged}")
    return 1 if result.errors else 0
