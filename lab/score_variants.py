"""The lab's variants of the score and its diagnostics, measured beside the shipped score
(`training.scoring.score_run`): several fixed masks, the score split into its pixel and embedding
parts, and the discrepancy in the encoder's own feature space with the decoder-free activation norm."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from models.detector import DetectorHead
from models.feature_taps import stage_module
from training.fit import FittedRun


@torch.no_grad()
def score_run_several_masks(
    run: FittedRun,
    images: np.ndarray,
    mask_ratio: float,
    n_masks: int,
    score_kind: str = "sse",
    batch_size: int = 256,
) -> np.ndarray:
    """A lab variant of the score: the mean over `n_masks` fixed, seeded visible-patch sets at
    `mask_ratio`. At the method's 0.99 test mask a 32 px image keeps no patch, so the rebuild comes
    from the embedding alone; a lower ratio shows the decoder some real patches, and averaging
    several fixed sets keeps the score deterministic while no single choice of patches decides it."""
    config = run.config
    keep = int(config.num_patches * (1 - mask_ratio))
    heads = []
    for k in range(n_masks):
        order = np.random.default_rng(config.mask_seed + 1 + k).permutation(config.num_patches)
        visible = sorted(int(i) for i in order[:keep])
        heads.append(DetectorHead(run.decoder, visible, run.encoder.mean, run.encoder.std, score_kind).eval())
    scores = []
    for start in tqdm(range(0, len(images), batch_size), desc="score", unit="batch", leave=False):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        embedding = run.encoder.embed(batch)
        scores.append(torch.stack([head(batch, embedding)[0] for head in heads]).mean(dim=0).numpy())
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


@torch.no_grad()
def score_parts(
    run: FittedRun,
    clean: np.ndarray,
    triggered: np.ndarray,
    score_kind: str = "sse",
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """The score of paired images (triggered[i] is clean[i] with the trigger) split into what moves
    it: the pixels the decoder compares against, or the embedding it rebuilds from.

    own: clean pixels, clean embedding (the clean score); embedding_only: clean pixels, the triggered
    image's embedding (a pure embedding swap, what a backdoor does and the method relies on);
    pixels_only: triggered pixels, the clean embedding (the trigger's pixels alone, which a backdoor-
    free encoder also shows); both: triggered pixels and embedding (the triggered score)."""
    if len(clean) != len(triggered):
        raise ValueError(f"paired sets differ in length: {len(clean)} clean, {len(triggered)} triggered")
    if len(clean) == 0:
        return {name: np.zeros(0, np.float32) for name in ("own", "embedding_only", "pixels_only", "both")}
    head = run.head(score_kind).eval()
    parts: dict[str, list[np.ndarray]] = {"own": [], "embedding_only": [], "pixels_only": [], "both": []}
    for start in tqdm(range(0, len(clean), batch_size), desc="score parts", unit="batch", leave=False):
        x = torch.from_numpy(np.ascontiguousarray(clean[start : start + batch_size]))
        x_t = torch.from_numpy(np.ascontiguousarray(triggered[start : start + batch_size]))
        z, z_t = run.encoder.embed(x), run.encoder.embed(x_t)
        for name, (pixels, embedding) in {
            "own": (x, z),
            "embedding_only": (x, z_t),
            "pixels_only": (x_t, z),
            "both": (x_t, z_t),
        }.items():
            parts[name].append(head(pixels, embedding)[0].float().numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


# The encoder stages a feature-space score compares (CIFAR and torchvision ResNets name them so).
FEATURE_STAGES = ("layer2", "layer3", "layer4")


@torch.no_grad()
def feature_space_scores(
    run: FittedRun,
    images: np.ndarray,
    stages: tuple[str, ...] = FEATURE_STAGES,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """A lab variant of the score in the encoder's own feature space, and the decoder-free cue it
    must be read against.

    `feature_<stage>`: squared distance between the encoder's feature maps at `stage` for the input
    and for its rebuild (the rebuild from the embedding alone, as in the shipped score): the method's
    discrepancy measured where the encoder sees content, not in pixels. `activation_norm_<stage>`:
    the squared norm of the input's feature map at that stage, no decoder involved; an attack that
    inflates intermediate activations on triggered inputs leaves this cue, as the plain BadEncoder
    leaves one in the embedding's norm. Needs a torch encoder with named stage modules; a stage name
    also finds the one module it ends (`layer3` is a CLIP tower's `visual.layer3`)."""
    encoder = run.encoder.module
    if encoder is None:
        raise ValueError("feature-space scores need a torch encoder (this run's is an ONNX black box)")
    modules = {stage: stage_module(encoder, stage) for stage in stages}
    detector = run.detector("sse")
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, stage=stage: captured.__setitem__(stage, out))
        for stage, module in modules.items()
    ]
    out: dict[str, list[np.ndarray]] = {
        f"{kind}_{s}": [] for kind in ("feature", "activation_norm") for s in stages
    }
    try:
        encoder.eval()
        for start in tqdm(
            range(0, len(images), batch_size), desc="feature scores", unit="batch", leave=False
        ):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            _, rebuild = detector(batch)  # runs the encoder on the input: captures its feature maps
            of_input = dict(captured)
            encoder(rebuild)  # the rebuild is in the encoder's normalized input space already
            for stage in stages:
                out[f"feature_{stage}"].append(
                    (of_input[stage] - captured[stage]).pow(2).flatten(1).sum(1).numpy()
                )
                out[f"activation_norm_{stage}"].append(of_input[stage].pow(2).flatten(1).sum(1).numpy())
    finally:
        for hook in hooks:
            hook.remove()
    return {
        name: np.concatenate(chunks) if chunks else np.zeros(0, np.float32) for name, chunks in out.items()
    }
