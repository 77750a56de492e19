"""The `dede` command line: fit, calibrate, export, score, serve (the product's offline half).

Each subcommand is a thin layer over a library function; errors that a user can fix are printed as
one line (`dede: error: ...`) with exit code 2, never as a traceback.

The lab's commands (`dede lab`, `pretrain`, `attack`, `eval`, `demo`) are not imported from here:
they come in through the `dede.commands` entry point (pyproject.toml), so the product never imports
the lab by name. `dede serve` builds the demo bundle when it has none through the `dede.demo` one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from models.bundle import BundleError
from training import (
    DEFAULT_FEATURE_RULE,
    DEFAULT_PRESET,
    DEFAULT_STANDARDISE_ON,
    FEATURE_RULE_NAMES,
    STANDARDISE_ON,
)

USER_ERRORS: tuple[type[Exception], ...] = (BundleError, FileNotFoundError, ValueError)
# Calibration images above a threshold below which `dede calibrate` says it is rough: a quantile
# set by fewer than ten images moves by a large share of its FPR between draws.
ROUGH_THRESHOLD_TAIL = 10


def _floats3(text: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError("expected three comma-separated numbers, e.g. 0.5,0.5,0.5")
    return values  # type: ignore[return-value]


def _size(text: str) -> tuple[int, int]:
    values = tuple(int(v) for v in text.lower().replace("x", ",").split(","))
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError("expected a size like 32 or 32x32")
    return values  # type: ignore[return-value]


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("encoder under test")
    group.add_argument(
        "--encoder",
        required=True,
        help="a state dict (.pt/.pth/.safetensors), TorchScript (.ts), ONNX (.onnx) file, "
        "`package.module:factory`, or `random:ARCH` (a freshly initialised encoder)",
    )
    group.add_argument(
        "--arch",
        help="architecture of a state dict, e.g. cifar_resnet18, resnet50, or openclip:<name> for an "
        "open_clip image tower (openclip:ViT-B-32, openclip:RN50; a whole CLIP or the tower alone)",
    )
    group.add_argument("--width", type=int, help="base width of a CIFAR ResNet (64 = standard)")
    group.add_argument("--input-size", type=_size, help="encoder input size, e.g. 32 or 224x224")
    group.add_argument("--mean", type=_floats3, help="normalization mean, e.g. 0.4914,0.4822,0.4465")
    group.add_argument("--std", type=_floats3, help="normalization std")
    group.add_argument(
        "--feature-tensors",
        type=lambda text: tuple(s for s in text.split(",") if s),
        help="ONNX encoders: comma-separated names of intermediate tensors of its graph where the "
        "feature score compares the input with its rebuild (torch encoders: see --feature-stages)",
    )


def _cmd_fit(args: argparse.Namespace) -> int:
    from models.encoders import load_encoder
    from training.data import limited, load_images
    from training.fit import FitSettings, fit_decoder

    encoder = load_encoder(
        args.encoder, args.arch, args.width, args.input_size, args.mean, args.std, args.feature_tensors
    )
    h, w = encoder.identity.input_size
    spec = encoder.identity.input_spec()
    images, _ = load_images(args.data, spec, args.limit)
    settings = FitSettings(
        preset=args.preset,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_minutes=args.max_minutes if args.max_minutes > 0 else None,
        patience=args.patience,
        views=args.views,
        feature_stages=args.feature_stages,
        feature_rule=args.feature_rule,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        data_source=limited(str(args.data), args.limit),
        poison_rate=getattr(args, "poison_rate", 0.0),
    )
    # A plugin (the lab) may add options that emulate a poisoned auxiliary set; it then sets
    # `make_poison`: (args, (H, W)) -> a uint8 NCHW image transform, or None.
    make_poison = getattr(args, "make_poison", None)
    poison = make_poison(args, (h, w)) if make_poison is not None else None
    path = fit_decoder(encoder, images, Path(args.out), settings, args.device, not args.no_resume, poison)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: the first process speaks for all
        print(f"fitted decoder: {path}  (validation losses: {Path(args.out) / 'log.csv'})")
        print(
            f"next: dede calibrate --run {args.out} --data <clean images of your own>"
            f"  (or --holdout: the fit's own held-out auxiliary images)"
        )
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from training.calibrate import calibrate_run
    from training.data import limited, load_images
    from training.fit import SHIFT_NOTE_UNITS, load_holdout_images, load_run

    run = load_run(Path(args.run))
    fit_source = str(run.info["fit"].get("data_source", "")).split(" (")[0]
    if args.holdout:
        if args.limit is not None:
            raise ValueError("--limit applies to --data, not to --holdout (the fit's split is fixed)")
        images = load_holdout_images(Path(args.run))
        source = f"the fit's held-out auxiliary images ({run.info['fit'].get('data_source', '')})"
        if run.info["fit"].get("poison_rate", 0) > 0 and not args.unlabelled:
            print(
                "warning: this fit's auxiliary images were partly triggered (--poison-rate), and so may "
                "be its held-out ones; add --unlabelled to set outliers aside before the quantile"
            )
    else:
        spec = run.encoder.identity.input_spec()
        images, _ = load_images(args.data, spec, args.limit)
        if str(args.data) == fit_source:  # limited draws of one source share their images (one seed)
            print(
                "warning: calibrating on the fitting data underestimates clean scores; use held-out "
                "images (--holdout: the fit's own)"
            )
        source = limited(str(args.data), args.limit)
    kind = "unlabelled_robust" if args.unlabelled else "clean"
    result = calibrate_run(
        Path(args.run),
        images,
        args.fpr,
        source,
        args.score,
        args.seed,
        kind,
        mirror_parity=args.holdout,
        standardise_on=args.standardise_on,
        tail_reference_is_calibration=args.holdout,
    )
    standardised = result.get("feature_standardisation")
    if standardised is None and args.standardise_on in ("calibration", "auto"):
        print(
            f"note: the {result['score_kind']} score has no per-depth statistics; "
            f"--standardise-on {args.standardise_on} applies to the feature score only"
        )
    if standardised:
        widest = standardised["widest_shift"]
        print(
            f"feature score standardised on the {standardised['on']} images ({standardised['n_images']})"
            + (
                f" (auto: the widest depth shift, {widest['median_z']:+.2f} units at {widest['depth']}, "
                f"{'reaches' if abs(widest['median_z']) >= SHIFT_NOTE_UNITS else 'is under'} {SHIFT_NOTE_UNITS:g})"
                if standardised.get("asked") == "auto" and "note" not in standardised
                else ""
            )
            + (f": {standardised['note']}" if "note" in standardised else "")
        )
        if standardised["on"] == "auxiliary" and abs(widest["median_z"]) >= SHIFT_NOTE_UNITS:
            print(
                f"note: at {widest['depth']} these images sit {widest['median_z']:+.2f} robust units from the "
                "auxiliary images' median, so that depth seldom (or always) sets the score on them; "
                "--standardise-on calibration measures each depth against these images instead "
                '(benchmarks/detection/README.md, "An eighth test")'
            )
    t = result["threshold"]
    low, high = t["realised_fpr_ci95"]
    if t.get("unlabelled_method") == "trimmed_quantile" and not args.holdout:
        print(
            "note: this fit kept no held-out images, so the unlabelled threshold is the trimmed quantile, "
            "which a few percent of triggered images can drag up; run `dede fit` again with the same "
            "--out (it resumes and writes them), then calibrate again"
        )
    if t.get("unlabelled_method") == "tail_shape":
        described = (
            f"{t['n_calibration']} unlabelled images (their median and MAD, and the clean tail's length "
            f"{t['tail_mads']:.2f} MADs read on {t['tail_reference']}, {t['n_tail_reference']} of them)"
        )
    else:
        described = f"{t['n_calibration']} {'clean' if kind == 'clean' else 'inlier'} images" + (
            f" ({t['n_trimmed']} set aside as outliers)" if t["n_trimmed"] else ""
        )
    print(
        f"{result['score_kind']} threshold {t['value']:.4f} for FPR {args.fpr} on {described}; "
        f"realised FPR by two folds ({t['n_holdout']} images, each half's threshold read on the other half): "
        f"{t['realised_fpr']:.4f} (95% CI {low:.4f}-{high:.4f})"
    )
    # The quantile that sets the threshold is read on the tail reference under tail_shape, else on
    # the calibration images: a handful above it makes it rough.
    if t.get("n_tail_reference"):
        counted, which = t["n_tail_reference"], "held-out images the clean tail's length is read on"
        remedy = "a fit on more auxiliary images (it holds 10% out), or a larger --fpr, steadies it"
    else:
        counted, which = t["n_calibration"], "calibration images"
        remedy = "more clean images, or a larger --fpr, steady it"
    above = int(args.fpr * counted)
    if above < ROUGH_THRESHOLD_TAIL:
        print(
            f"note: only {above} of the {counted} {which} {'lies' if above == 1 else 'lie'} above "
            f"its quantile, so the threshold is rough (see the interval); {remedy}"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_bundle
    from training.fit import load_run

    manifest = export_bundle(load_run(Path(args.run)), Path(args.out), args.name, args.version, args.force)
    size = sum(f.bytes for f in manifest.files)
    print(f"bundle written: {args.out} ({size / 1e6:.1f} MB); parity: {json.dumps(manifest.parity)}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from training.offline_score import run_score_command

    return run_score_command(args.bundle, args.paths, args.format, args.output, args.batch_size, args.explain)


# Entry-point groups through which other packages of this distribution (the lab) extend the CLI.
COMMANDS_GROUP = "dede.commands"  # name -> register(subparsers)
DEMO_GROUP = "dede.demo"  # `builder` -> a module with DEFAULT_DEMO_DIR and build_demo_bundle(path)


def _demo_builder():  # noqa: ANN202 - a module found at run time
    found = entry_points(group=DEMO_GROUP, name="builder")
    return _load_plugin(next(iter(found))) if found else None


def serve(argv: list[str]) -> int:
    """`dede serve [FLAGS]`: the service's own flags (see `dede serve --help`); with no bundle
    given and no demo bundle yet, the demo bundle is built first (minutes, progress shown)."""
    from service.main import build_parser as service_parser
    from service.main import run, settings_from_args

    parser = service_parser(prog="dede serve")
    settings = settings_from_args(parser.parse_args(argv), parser)
    if not settings.bundle.exists():
        demo = _demo_builder()
        if demo is not None and settings.bundle.resolve() == demo.DEFAULT_DEMO_DIR.resolve():
            print(f"no bundle at {settings.bundle}: building the demo bundle first")
            demo.build_demo_bundle(demo.DEFAULT_DEMO_DIR)
    run(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dede",
        description="Detect backdoor samples for self-supervised image encoders (DeDe): fit a decoder "
        "that rebuilds images from the encoder's embeddings, calibrate a threshold on clean images, "
        "export one ONNX bundle, and serve it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser(
        "fit",
        help="train the DeDe decoder for a frozen encoder on auxiliary images",
        description="Train the DeDe decoder for a frozen encoder on auxiliary images. Runs as it is "
        "on one device, or data-parallel under torchrun, one process per GPU: "
        "`torchrun --nproc_per_node=N -m training.cli fit ...` (the same flags; --batch-size stays "
        "the global batch; rank 0 alone writes --out).",
    )
    add_encoder_arguments(fit)
    fit.add_argument(
        "--data",
        required=True,
        help="auxiliary images: .npz (x, y), CIFAR-10 batches folder, image folder, or a name in $DEDE_DATA_DIR such as tinyimagenet_val",
    )
    fit.add_argument(
        "--limit", type=int, help="use N of the images, drawn at random (seed 0), not the first N"
    )
    fit.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=["conv", "conv_paper", "lab", "lab_wide", "paper", "tiny", "conv_tiny"],
        help=f"decoder family and size (default: {DEFAULT_PRESET}, the convolutional decoder sized for "
        "CPU; conv_paper for GPUs; lab/paper: the method's MAE decoder)",
    )
    fit.add_argument(
        "--max-steps", type=int, help="optimizer-step budget (default: the preset's, 3000 for conv)"
    )
    fit.add_argument(
        "--max-minutes",
        type=float,
        default=12.0,
        help="wall-clock budget of the training loop in minutes (default 12; 0: none)",
    )
    fit.add_argument(
        "--patience",
        type=int,
        default=6,
        help="validations (every 100 steps) without a 0.5%% gain before the fit stops at a plateau",
    )
    fit.add_argument(
        "--views", type=int, help="augmented views (crop + flip) per image (default: 8 up to 64 px, else 2)"
    )
    fit.add_argument(
        "--feature-stages",
        default="auto",
        help="encoder stages of the feature score: auto (relative depths 1/2, 3/4, 1: layer2-4 of a "
        "ResNet), none, or comma-separated module names",
    )
    fit.add_argument(
        "--feature-rule",
        default=DEFAULT_FEATURE_RULE,
        choices=list(FEATURE_RULE_NAMES),
        help="depths of the feature score and how they combine: max_all (default: the pixels at four "
        "scales and the stages, max of their robust z-scores), max_all_both (each depth compared squared "
        "and relative: ahead on whole-image triggers, behind on CLIP towers), max_all_relative (each depth's "
        "discrepancy over its two maps' mean squares alone: ahead on norm-keeping attacks and whole-image "
        "triggers, behind on the plain BadEncoder), max_all_both_balanced (max_all_both with each view's "
        "z-scores over its max's clean upper tail), max_all_tail (max_all's depths each scaled by its clean "
        "upper tail), or mean_stages (the stages alone, mean; the first default); "
        "benchmarks/detection/README.md measures each",
    )
    fit.add_argument("--epochs", type=int, help="a step budget in passes over the images instead")
    fit.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="global batch size (default 128); under torchrun it is split among the processes, so "
        "the same steps see the same images whatever their number",
    )
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument(
        "--device",
        help="cuda, cuda:1 or cpu (default: cuda when present); under torchrun each process takes "
        "cuda:LOCAL_RANK (backend nccl), or the CPU with --device cpu (backend gloo)",
    )
    fit.add_argument("--out", required=True, help="run directory (checkpoints, loss log, decoder)")
    fit.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    fit.set_defaults(func=_cmd_fit)

    cal = sub.add_parser("calibrate", help="set the threshold on clean held-out images for a target FPR")
    cal.add_argument("--run", required=True, help="a fitted run directory")
    cal_source = cal.add_mutually_exclusive_group(required=True)
    cal_source.add_argument(
        "--data", help="CLEAN held-out images (or, with --unlabelled, a sample of traffic)"
    )
    cal_source.add_argument(
        "--holdout",
        action="store_true",
        help="the fit's own held-out auxiliary images (the 10%% it never trained on): the paper's "
        "out-of-distribution threshold, with no other data",
    )
    cal.add_argument(
        "--limit", type=int, help="use N of the images, drawn at random (seed 0), not the first N"
    )
    cal.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate (default 0.01)")
    cal.add_argument(
        "--score",
        choices=["feature", "sse", "max_patch"],
        help="the score to ship (default: feature where the fit measured its statistics, else sse)",
    )
    cal.add_argument(
        "--unlabelled",
        action="store_true",
        help="--data is an unlabelled sample of your traffic that may hold a few percent of triggered "
        "images: the threshold is its median plus its MAD times the clean tail's length read on the "
        "fit's held-out images (with --holdout: outliers set aside before the quantile)",
    )
    cal.add_argument("--seed", type=int, default=0, help="seed of the calibration / held-out split")
    cal.add_argument(
        "--standardise-on",
        choices=STANDARDISE_ON,
        default=DEFAULT_STANDARDISE_ON,
        help="where the feature score's per-depth centre and unit come from: the fit's held-out "
        "auxiliary images, the calibration images that set the threshold (at least 100 of them), or "
        "auto: the calibration images where some depth's median sits a robust unit or more from the "
        "auxiliary images' "
        f"(default {DEFAULT_STANDARDISE_ON})",
    )
    cal.set_defaults(func=_cmd_calibrate)

    exp = sub.add_parser("export", help="write detector.onnx + manifest.json, verified against PyTorch")
    exp.add_argument("--run", required=True)
    exp.add_argument("--out", required=True, help="bundle directory to create")
    exp.add_argument("--name", default="dede-detector", help="model name in the manifest")
    exp.add_argument("--version", default="1", help="model version in the manifest")
    exp.add_argument("--force", action="store_true", help="replace --out if it exists")
    exp.set_defaults(func=_cmd_export)

    score = sub.add_parser("score", help="score image files offline through a bundle (ONNX Runtime)")
    score.add_argument("--bundle", required=True)
    score.add_argument("paths", nargs="+", help="image files or directories")
    score.add_argument("--format", default="table", choices=["table", "csv", "jsonl"])
    score.add_argument("--output", help="write to this file instead of standard output")
    score.add_argument("--batch-size", type=int, default=64)
    score.add_argument(
        "--explain",
        metavar="OUT_DIR",
        help="also write one PNG per image to OUT_DIR: input | rebuild | heat map over the input "
        "(yellow = as unusual as the threshold, red = twice that)",
    )
    score.set_defaults(func=_cmd_score)

    # Listed for --help only: main() hands `detect` to the client's own parser, before any import of
    # torch, so that the client runs where only `dede[client]` is installed.
    sub.add_parser(
        "detect",
        add_help=False,
        help="score image files with a running service: dede detect URL FILES... (`dede detect --help`)",
    )

    # Listed for --help only: main() hands `serve` and its flags to the service's own parser.
    sub.add_parser(
        "serve",
        add_help=False,
        help="serve a bundle over HTTP (POST /detect); every setting is a flag or a DEDE_ variable "
        "(`dede serve --help`); with no bundle given, builds and serves the demo",
    )

    for plugin in sorted(entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name):
        register = _load_plugin(plugin)
        if register is not None:
            register(sub)
    return parser


def _load_plugin(plugin: EntryPoint) -> object | None:
    """The entry point's object, or None when its own package is not installed (the training image
    ships the product without the lab); an import error inside the package is still raised."""
    try:
        return plugin.load()
    except ModuleNotFoundError as exc:
        if exc.name and plugin.module.split(".")[0] == exc.name.split(".")[0]:
            return None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["detect"]:
        from dede.detect_cli import run as detect

        return detect(argv[1:])
    parser = build_parser()
    if argv[:1] == ["serve"]:
        args = argparse.Namespace(func=lambda _: serve(argv[1:]))
    else:
        args = parser.parse_args(argv)
    from models.encoders import EncoderLoadError
    from training.data import DataError
    from training.fit import RunError

    try:
        return int(args.func(args) or 0)
    except (*USER_ERRORS, EncoderLoadError, DataError, RunError, _export_error()) as exc:
        print(f"dede: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dede: interrupted (long jobs resume from their last checkpoint)", file=sys.stderr)
        return 130


def _export_error() -> type[Exception]:
    from training.export import ExportError

    return ExportError


if __name__ == "__main__":
    sys.exit(main())
