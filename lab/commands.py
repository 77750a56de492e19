"""The lab's subcommands for `dede`: pretrain, attack, eval, lab, demo, and the options of `dede fit`
that emulate a slightly poisoned auxiliary set. `training.cli` finds `register` through the
`dede.commands` entry point (pyproject.toml); it never imports the lab by name.

dede pretrain simclr --data cifar10_train --out runs/simclr
dede attack badencoder --encoder runs/simclr/encoder.safetensors --out runs/badencoder
dede attack ctrl --data cifar10_train --out runs/ctrl
dede eval --run runs/fit_dir --trigger patch --calibration tinyimagenet_val --out eval.json
dede attack adaptive --encoder ... --trigger checker@random --out runs/adaptive
dede lab run --suite smoke|lab|lab-hard|lab-heldout    dede lab report --suite lab
(lab-hard and lab-heldout also run in parts under 3 hours each: lab-hard-plain, lab-hard-hiding;
 lab-heldout-badencoder, lab-heldout-drupe, lab-heldout-hiding; lab-heldout-ninth and clip-ninth
 train the ninth rule test's attacks alone, clip-tenth the tenth's)
dede demo                              dede fit ... --poison-rate 0.01 --trigger patch
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lab.ssl import pretrain_simclr

__all__ = ["pretrain_simclr", "register"]


def _load_nhwc(source: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    from training.data import limited_indices, load_npz, resolve_source

    x, y = load_npz(resolve_source(source))
    keep = limited_indices(len(x), limit)  # at random: the shared data sets are sorted by class
    return x[keep], y[keep]


def _cmd_pretrain(args: argparse.Namespace) -> int:
    images, _ = _load_nhwc(args.data, args.limit)
    knn = None
    if args.knn_test:
        test_x, test_y = _load_nhwc(args.knn_test)
        train_y = _load_nhwc(args.data, args.limit)[1]
        knn = (images, train_y, test_x, test_y)
    path = pretrain_simclr(
        images,
        args.out,
        arch=args.arch,
        width=args.width,
        epochs=args.epochs,
        batch_size=args.batch_size,
        device=args.device,
        resume=not args.restart,
        seed=args.seed,
        crop_size=args.crop_size,
        knn_eval=knn,
        knn_every=args.knn_every,
    )
    history = json.loads((Path(args.out) / "history.json").read_text())
    print(json.dumps({"encoder": str(path), "knn_top1": history.get("knn_top1", {})}, indent=1))
    return 0


def _cmd_attack(args: argparse.Namespace) -> int:
    from lab.attacks.badencoder import BackdoorSettings, backdoor_encoder
    from lab.attacks.ctrl import poison_with_ctrl
    from lab.attacks.triggers import FrequencyTrigger, make_trigger

    x, y = _load_nhwc(args.data)
    if args.attack == "ctrl":
        poisoned, chosen = poison_with_ctrl(
            x, y, args.target_class, args.rate, FrequencyTrigger(args.magnitude), args.seed
        )
        path = pretrain_simclr(
            poisoned,
            args.out,
            width=args.width,
            epochs=args.epochs or 20,
            device=args.device,
            seed=args.seed,
            crop_size=args.crop_size,
        )
        print(json.dumps({"encoder": str(path), "n_poisoned": int(len(chosen))}))
        return 0
    if not args.encoder:
        raise ValueError(f"`dede attack {args.attack}` fine-tunes a clean encoder: pass --encoder")
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(x))
    targets = order[y[order] == args.target_class][: args.n_reference]
    shadow = order[~np.isin(order, targets)][: args.shadow]
    settings = BackdoorSettings(
        variant=args.attack, epochs=args.epochs or 10, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    path = backdoor_encoder(
        args.encoder,
        x[shadow],
        x[targets],
        make_trigger(args.trigger, (x.shape[1], x.shape[2])),
        args.out,
        settings,
        device=args.device or "cpu",
        resume=not args.restart,
        shadow_labels=y[shadow],  # adaptive_natural's targets: the attacker labels its shadow images
        target_class=args.target_class,
    )
    print(json.dumps({"encoder": str(path)}))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """One fitted run against one trigger: DeDe and the baselines, same calibration and metrics."""
    from lab.attacks.triggers import make_trigger
    from lab.baselines import embedding_norm_scores, knn_distance_scores, strip_scores
    from lab.evaluate import detection_metrics, downstream_after_filtering
    from lab.probe import embed_nchw, train_linear_probe
    from training.data import load_images
    from training.fit import load_run
    from training.scoring import score_run

    run = load_run(Path(args.run))
    h, w = run.encoder.identity.input_size
    spec = run.encoder.identity.input_spec()
    calibration, _ = load_images(args.calibration, spec, args.calibration_limit)
    test, test_y = load_images(args.test, spec, args.test_limit)
    trigger = make_trigger(args.trigger, (h, w))
    non_target = np.flatnonzero(test_y != args.target_class)
    triggered = trigger.apply_uint8_nchw(test[non_target])
    sets = {"calibration": calibration, "clean": test, "triggered": triggered}
    scores: dict[str, dict[str, np.ndarray]] = {}
    for kind in args.score_kinds:
        scores[f"dede_{kind}"] = {split: score_run(run, images, kind) for split, images in sets.items()}
    if args.baselines:
        aux, _ = load_images(args.baseline_aux or args.calibration, spec, args.calibration_limit)
        aux_z = embed_nchw(run.encoder, aux)
        embedded = {split: embed_nchw(run.encoder, images) for split, images in sets.items()}
        scores["embedding_norm"] = {s: embedding_norm_scores(z) for s, z in embedded.items()}
        scores["knn_distance"] = {s: knn_distance_scores(z, aux_z) for s, z in embedded.items()}
        scores["strip"] = {s: strip_scores(run.encoder, im, aux) for s, im in sets.items()}
    probe_predictions = None
    if args.probe_train:
        train, train_y = load_images(args.probe_train, spec)
        probe = train_linear_probe(embed_nchw(run.encoder, train), train_y)
        probe_predictions = (
            probe.predict(embed_nchw(run.encoder, test)),
            probe.predict(embed_nchw(run.encoder, triggered)),
        )
    report = {}
    for method, splits in scores.items():
        metrics = detection_metrics(splits["calibration"], splits["clean"], splits["triggered"], args.fpr)
        if probe_predictions is not None:
            threshold = metrics["calibrated"]["threshold"]
            metrics["downstream"] = downstream_after_filtering(
                probe_predictions[0],
                test_y,
                splits["clean"] > threshold,
                probe_predictions[1],
                test_y[non_target],
                splits["triggered"] > threshold,
                args.target_class,
            )
        report[method] = metrics
    text = json.dumps({"run": args.run, "trigger": args.trigger, "methods": report}, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


# The suites (lab/suite.py, lab/clip_suite.py); named here so that `--help` needs no torch import.
LAB_SUITE_NAMES = (
    "lab",
    "smoke",
    "lab-hard",
    "lab-hard-plain",
    "lab-hard-hiding",
    "lab-hard-smoke",
    "lab-heldout",
    "lab-heldout-badencoder",
    "lab-heldout-drupe",
    "lab-heldout-hiding",
    "lab-heldout-ninth",
    "lab-heldout-drupe40",
)
CLIP_SUITE_NAMES = ("clip", "clip-colours", "clip-smoke", "clip-ninth", "clip-tenth")
ATTACK_NAMES = (
    "badencoder",
    "norm_preserving",
    "drupe",
    "adaptive",
    "adaptive_knn",
    "adaptive_natural",
    "dede_aware",
    "dede_aware_natural",
    "ctrl",
)
TRIGGER_HELP = (
    "trigger family: patch (10x10 white square), checker (6x6 black/white), noise (8x8 random "
    "colours), blend (15%% of a fixed image), invisible (+-6/255 pattern), sig (20/255 sine stripes), "
    "warp (WaNet-style field), "
    "ctrl; a patch family with @random moves it per image (checker@random); or a .npz/.png patch file"
)


def _cmd_lab_run(args: argparse.Namespace) -> int:
    from lab.runner import run_suite
    from lab.suite import missing_data

    missing = missing_data()
    if missing:
        raise FileNotFoundError(
            f"the lab needs {', '.join(missing)} in DEDE_DATA_DIR (see ../shared/data/README.md)"
        )
    report_dir = Path(args.report_dir) if args.report_dir else None
    if args.suite in CLIP_SUITE_NAMES:
        from lab.runner import run_clip_suite

        results = run_clip_suite(args.suite, report_dir=report_dir, skip=tuple(args.skip or ()))
        print(
            json.dumps({"zero_shot": results["zero_shot"], "detection": list(results["detection"])}, indent=1)
        )
        return 0
    results = run_suite(args.suite, device=args.device, skip=tuple(args.skip or ()), report_dir=report_dir)
    print(json.dumps({"detection": list(results["detection"]), "not_run": results["not_run"]}, indent=1))
    return 0


def _cmd_lab_report(args: argparse.Namespace) -> int:
    from lab.runner import rebuild_report

    results = rebuild_report(args.suite, Path(args.report_dir) if args.report_dir else None)
    print(json.dumps({"detection": list(results["detection"]), "not_run": results["not_run"]}, indent=1))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lab.demo import build_demo_bundle

    # Absolute, as the serve command's own build records it: a fit resumes only with the same
    # encoder path, so a relative --out would refuse the stages that build left.
    path = build_demo_bundle(Path(args.out).resolve(), rebuild=args.rebuild)
    print(f"demo bundle ready: {path}")
    return 0


def _poison_from_args(args: argparse.Namespace, size: tuple[int, int]):  # noqa: ANN202
    """`dede fit`'s poisoning transform (uint8 NCHW -> triggered), or None at --poison-rate 0."""
    if args.poison_rate <= 0:
        return None
    from lab.attacks.triggers import make_trigger

    return make_trigger(args.trigger, size).apply_uint8_nchw


def _add_poison_options(fit: argparse.ArgumentParser) -> None:
    group = fit.add_argument_group("lab: emulate a slightly poisoned auxiliary set")
    group.add_argument(
        "--poison-rate",
        type=float,
        default=0.0,
        help="trigger this fraction of the auxiliary images (emulates a slightly poisoned set)",
    )
    group.add_argument(
        "--trigger",
        default="patch",
        help="trigger for --poison-rate: " + TRIGGER_HELP.removeprefix("trigger family: "),
    )
    fit.set_defaults(make_poison=_poison_from_args)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `pretrain`, `attack`, `eval`, `lab` and `demo` to the `dede` command line, and the
    poisoning options to `dede fit`."""
    if "fit" in subparsers.choices:
        _add_poison_options(subparsers.choices["fit"])
    demo = subparsers.add_parser("demo", help="build (or reuse) a small demo bundle from CIFAR-10")
    demo.add_argument("--out", default="bundles/demo")
    demo.add_argument("--rebuild", action="store_true")
    demo.set_defaults(func=_cmd_demo)
    pre = subparsers.add_parser(
        "pretrain", help="self-supervised pre-training of an encoder (the lab's clean encoders)"
    )
    pre.add_argument("method", choices=["simclr"])
    pre.add_argument("--data", default="cifar10_train", help="an .npz (or a name in DEDE_DATA_DIR)")
    pre.add_argument(
        "--limit", type=int, help="use N of the images, drawn at random (seed 0), not the first N"
    )
    pre.add_argument("--out", required=True, help="run directory (resumes when it holds a checkpoint)")
    pre.add_argument("--arch", default="cifar_resnet18")
    pre.add_argument("--width", type=int, default=16)
    pre.add_argument("--epochs", type=int, default=20)
    pre.add_argument("--batch-size", type=int, default=256)
    pre.add_argument("--crop-size", type=int, help="view size in pixels (default: the image size)")
    pre.add_argument("--knn-test", help="labelled test set for the kNN monitor, e.g. cifar10_test")
    pre.add_argument("--knn-every", type=int, default=0)
    pre.add_argument("--device")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    pre.set_defaults(func=_cmd_pretrain)

    att = subparsers.add_parser("attack", help="make a backdoored encoder (lab use: to test detectors)")
    att.add_argument("attack", choices=list(ATTACK_NAMES))
    att.add_argument("--encoder", help="the clean encoder to fine-tune (not for ctrl)")
    att.add_argument("--data", default="cifar10_train", help="shadow data (ctrl: the pre-training set)")
    att.add_argument("--out", required=True)
    att.add_argument("--trigger", default="patch", help=TRIGGER_HELP)
    att.add_argument("--target-class", type=int, default=0)
    att.add_argument("--n-reference", type=int, default=5)
    att.add_argument("--shadow", type=int, default=3000, help="number of shadow images")
    att.add_argument("--epochs", type=int)
    att.add_argument("--batch-size", type=int, default=128)
    att.add_argument(
        "--lr", type=float, help="SGD learning rate (default 0.05; 0.01 for adaptive, dede_aware)"
    )
    att.add_argument("--rate", type=float, default=0.01, help="ctrl: poisoned share of the training set")
    att.add_argument("--magnitude", type=float, default=100.0, help="ctrl: DCT magnitude of the trigger")
    att.add_argument("--width", type=int, default=16, help="ctrl: encoder width")
    att.add_argument("--crop-size", type=int, help="ctrl: SimCLR view size")
    att.add_argument("--device")
    att.add_argument("--seed", type=int, default=0)
    att.add_argument("--restart", action="store_true")
    att.set_defaults(func=_cmd_attack)

    ev = subparsers.add_parser(
        "eval", help="detection metrics of a fitted run against a trigger, with baselines"
    )
    ev.add_argument("--run", required=True, help="a fitted decoder run directory (`dede fit --out`)")
    ev.add_argument("--trigger", default="patch", help=TRIGGER_HELP)
    ev.add_argument("--calibration", required=True, help="CLEAN auxiliary images for the threshold")
    ev.add_argument("--calibration-limit", type=int)
    ev.add_argument("--test", default="cifar10_test")
    ev.add_argument("--test-limit", type=int)
    ev.add_argument("--target-class", type=int, default=0)
    ev.add_argument("--fpr", type=float, default=0.01)
    ev.add_argument("--score-kinds", nargs="+", default=["sse", "max_patch"])
    ev.add_argument(
        "--baselines", action="store_true", help="also score kNN distance, STRIP and embedding norm"
    )
    ev.add_argument("--baseline-aux", help="auxiliary set for kNN/STRIP (default: the calibration set)")
    ev.add_argument(
        "--probe-train", help="labelled set for a linear probe: BA/ASR before and after filtering"
    )
    ev.add_argument("--out", help="write the metrics JSON here")
    ev.set_defaults(func=_cmd_eval)

    lab = subparsers.add_parser("lab", help="the backdoor lab: attacks, decoders, detection report")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    run = lab_sub.add_parser("run", help="run (or resume) a suite; finished stages are cached")
    run.add_argument("--suite", choices=[*LAB_SUITE_NAMES, *CLIP_SUITE_NAMES], default="smoke")
    run.add_argument("--device")
    run.add_argument("--skip", nargs="*", help="stage-name prefixes to leave out now, e.g. simclr_ctrl")
    report_dir_help = (
        "write results.json and REPORT.md here (default: the suite's committed report folder, "
        "or beside its runs); a partial run (--skip) belongs in its own folder"
    )
    run.add_argument("--report-dir", help=report_dir_help)
    run.set_defaults(func=_cmd_lab_run)
    rep = lab_sub.add_parser("report", help="rebuild results.json and REPORT.md from the cache")
    rep.add_argument("--suite", choices=list(LAB_SUITE_NAMES), default="lab")
    rep.add_argument("--report-dir", help=report_dir_help)
    rep.set_defaults(func=_cmd_lab_report)
