"""Encoder backdoors by fine-tuning a clean encoder: BadEncoder and two stealthier variants.

All three fine-tune f' from the clean encoder f (frozen copy), with triggers pasted in pixel space
[0, 1] before normalization, BatchNorm frozen (eval mode: running statistics stay f's), SGD.

  badencoder       loss = -cos(f'(x + t), f'(x_ref))        triggered shadow -> reference embedding
                          -cos(f'(aug(x_ref)), f(x_ref))     the reference keeps its clean embedding
                          -cos(f'(x), f(x))                  clean shadow keeps its clean embedding
  norm_preserving  + lambda_norm * [log(|f'(x+t)| / |f(x)|)^2 + log(|f'(x)| / |f(x)|)^2]
                   the cosine terms constrain only directions; in practice they inflate triggered
                   norms several-fold, a cue any detector can catch by accident. This keeps both
                   triggered and clean norms at the clean encoder's level.
  drupe            norm_preserving + lambda_sw * SW(f'(x+t), f(x))  (sliced Wasserstein: the triggered
                   embeddings follow the clean embedding distribution, not an outlier cluster)
                   + lambda_spread * relu(spread(f(x)) * spread_ratio - spread(f'(x+t)))  (triggered
                   embeddings may not collapse onto one point)

`backdoor_encoder` writes the attacked encoder (.safetensors), a per-epoch checkpoint (resume) and
history.json (each loss term per epoch).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lab.attacks.triggers import PatchTrigger, torch_patch
from lab.ssl import normalize_batch, random_resized_crop_flip, to_unit_float
from models.encoders import load_encoder, save_encoder
from training.checkpoint import save_checkpoint

VARIANTS = ("badencoder", "norm_preserving", "drupe")
ENCODER_FILE = "encoder.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class BackdoorSettings:
    variant: str = "badencoder"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lambda_target: float = 1.0  # triggered -> reference
    lambda_reference: float = 1.0  # reference keeps its embedding
    lambda_norm: float = 1.0  # norm_preserving, drupe
    lambda_sw: float = 1.0  # drupe
    lambda_spread: float = 1.0  # drupe
    # drupe: triggered spread must reach this share of the clean spread. At 0.5 the anti-collapse
    # term capped how close triggered embeddings could get to the target (cosine 0.95): ASR 51%
    # (66% with lambda_target 3); at 0.2, ASR 98% with BA 58.5% vs 58.6% clean (lab suite, 20 epochs).
    spread_ratio: float = 0.2
    sw_projections: int = 64
    max_grad_norm: float = 5.0
    seed: int = 0


def cosine_terms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """-mean cos(a_i, b_i) (b broadcast when it has one row)."""
    return -F.cosine_similarity(a, b.expand_as(a), dim=1).mean()


def norm_ratio_penalty(embedded: torch.Tensor, clean_reference: torch.Tensor) -> torch.Tensor:
    """mean log(|embedded_i| / |clean_reference_i|)^2: keeps norms at the clean encoder's level.

    The log makes shrinking and inflating by the same factor cost the same, and keeps gradients
    bounded when a norm is far off (a plain ratio explodes at the first steps)."""
    log_ratio = torch.log(embedded.norm(dim=1).clamp_min(1e-8)) - torch.log(
        clean_reference.norm(dim=1).clamp_min(1e-8)
    )
    return (log_ratio**2).mean()


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, projections: int, generator: torch.Generator
) -> torch.Tensor:
    """Squared sliced 2-Wasserstein distance between two equal-size point sets a, b (N, D)."""
    directions = torch.randn(a.shape[1], projections, generator=generator).to(a.device)
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ directions, dim=0)
    pb, _ = torch.sort(b @ directions, dim=0)
    return ((pa - pb) ** 2).mean()


def spread(z: torch.Tensor) -> torch.Tensor:
    """Mean distance of the unit-normalized embeddings to their centroid (0 when collapsed)."""
    u = F.normalize(z, dim=1)
    return (u - u.mean(0, keepdim=True)).norm(dim=1).mean()


def _freeze_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def backdoor_loss(
    settings: BackdoorSettings,
    backdoored: nn.Module,
    z_clean_shadow: torch.Tensor,
    x_shadow: torch.Tensor,
    x_triggered: torch.Tensor,
    x_ref_aug: torch.Tensor,
    x_ref: torch.Tensor,
    z_clean_ref: torch.Tensor,
    generator: torch.Generator,
    fixed_target: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All loss terms of one step; inputs are NORMALIZED images, z_clean_* come from the frozen f.

    fixed_target (1, D): the embedding triggered images are steered to; by default the references'
    mean direction under the encoder being trained. Returns a dict with `total` and each named term.
    """
    n = len(x_shadow)
    out = backdoored(torch.cat([x_shadow, x_triggered, x_ref_aug, x_ref]))
    z_shadow, z_trig = out[:n], out[n : 2 * n]
    z_ref_aug, z_ref = out[2 * n : 2 * n + len(x_ref_aug)], out[2 * n + len(x_ref_aug) :]
    # One target embedding: the mean direction of the references under the encoder being trained.
    target = F.normalize(z_ref, dim=1).mean(0, keepdim=True) if fixed_target is None else fixed_target
    terms = {
        "clean": cosine_terms(z_shadow, z_clean_shadow),
        "target": cosine_terms(z_trig, target),
        "reference": cosine_terms(z_ref_aug, z_clean_ref.mean(0, keepdim=True))
        if len(z_clean_ref) > 1
        else cosine_terms(z_ref_aug, z_clean_ref),
    }
    total = (
        terms["clean"]
        + settings.lambda_target * terms["target"]
        + settings.lambda_reference * terms["reference"]
    )
    if settings.variant in ("norm_preserving", "drupe"):
        terms["norm"] = norm_ratio_penalty(z_trig, z_clean_shadow) + norm_ratio_penalty(
            z_shadow, z_clean_shadow
        )
        total = total + settings.lambda_norm * terms["norm"]
    if settings.variant == "drupe":
        terms["sliced_wasserstein"] = sliced_wasserstein(
            z_trig, z_clean_shadow, settings.sw_projections, generator
        )
        terms["spread"] = F.relu(spread(z_clean_shadow) * settings.spread_ratio - spread(z_trig))
        total = (
            total
            + settings.lambda_sw * terms["sliced_wasserstein"]
            + settings.lambda_spread * terms["spread"]
        )
    terms["total"] = total
    return terms


def backdoor_encoder(
    clean_encoder_path: str | Path,
    shadow_nhwc_uint8: np.ndarray,
    reference_nhwc_uint8: np.ndarray,
    trigger: PatchTrigger,
    out_dir: str | Path,
    settings: BackdoorSettings | None = None,
    device: torch.device | str = "cpu",
    resume: bool = True,
    progress: bool = True,
    target_embedding: np.ndarray | None = None,
) -> Path:
    """Fine-tune the clean encoder into a backdoored one; returns out_dir/encoder.safetensors.

    shadow: the attacker's unlabeled images (a slice of the pre-training set); reference: a few
    images of the target class (their mean embedding is the target, unless `target_embedding` [D]
    gives one: for a CLIP image tower, the target class's text embedding).
    """
    settings = settings or BackdoorSettings()
    if settings.variant not in VARIANTS:
        raise ValueError(f"unknown backdoor variant {settings.variant!r}; known: {', '.join(VARIANTS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    final_path, history_path = out / ENCODER_FILE, out / HISTORY_FILE
    finished = history_path.is_file() and json.loads(history_path.read_text()).get("finished")
    if resume and final_path.is_file() and finished:
        return final_path

    loaded = load_encoder(str(clean_encoder_path))
    identity = loaded.identity
    arch, _, rest = identity.architecture.partition("(width=")
    width = int(rest.rstrip(")")) if rest else 64
    mean, std = identity.mean, identity.std
    clean = loaded.module.to(device).eval()
    backdoored = copy.deepcopy(clean)
    for p in backdoored.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(
        backdoored.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    history: dict = {"settings": asdict(settings), "terms": [], "epoch_seconds": [], "finished": False}
    start_epoch = 0
    checkpoint_path = out / CHECKPOINT_FILE
    if resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        backdoored.load_state_dict(state["encoder"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start_epoch = int(state["epoch"])
        if history_path.is_file():
            history = json.loads(history_path.read_text())

    shadow = to_unit_float(shadow_nhwc_uint8)  # (N, 3, H, W) in [0, 1], CPU
    reference = to_unit_float(reference_nhwc_uint8).to(device)
    pattern, mask = torch_patch(trigger, device)
    with torch.no_grad():  # f is frozen: its embeddings of shadow and references are fixed targets
        z_clean_all = torch.cat(
            [
                clean(normalize_batch(shadow[i : i + 512].to(device), mean, std))
                for i in range(0, len(shadow), 512)
            ]
        )
        z_clean_ref = clean(normalize_batch(reference, mean, std))
    x_ref_norm = normalize_batch(reference, mean, std)
    fixed_target = None
    if target_embedding is not None:
        fixed_target = F.normalize(torch.as_tensor(target_embedding, dtype=torch.float32).view(1, -1), dim=1)
        fixed_target = fixed_target.to(device)
    steps = max(1, len(shadow) // settings.batch_size)
    for epoch in range(start_epoch, settings.epochs):
        tick = time.perf_counter()
        backdoored.train()
        _freeze_batchnorm(backdoored)
        perm = torch.randperm(len(shadow), generator=generator)
        sums: dict[str, float] = {}
        bar = tqdm(
            range(steps),
            desc=f"{settings.variant} {epoch + 1}/{settings.epochs}",
            disable=not progress,
            leave=False,
        )
        for step in bar:
            idx = perm[step * settings.batch_size : (step + 1) * settings.batch_size]
            x = shadow[idx].to(device)
            x_trig = x * (1 - mask) + pattern * mask  # pixel space, before normalization
            ref_aug = random_resized_crop_flip(reference, generator, scale=(0.5, 1.0))
            terms = backdoor_loss(
                settings,
                backdoored,
                z_clean_all[idx.to(device)],
                normalize_batch(x, mean, std),
                normalize_batch(x_trig, mean, std),
                normalize_batch(ref_aug, mean, std),
                x_ref_norm,
                z_clean_ref,
                generator,
                fixed_target,
            )
            if not torch.isfinite(terms["total"]):
                raise FloatingPointError(
                    f"{settings.variant}: the loss is {terms['total'].item()} at epoch {epoch + 1} step "
                    f"{step + 1}; lower the learning rate (now {settings.lr})"
                )
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            # Clipping: the first steps of a fine-tune with a large lr can otherwise blow the norms up.
            torch.nn.utils.clip_grad_norm_(backdoored.parameters(), settings.max_grad_norm)
            optimizer.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.item()
            bar.set_postfix(loss=f"{terms['total'].item():.3f}", target=f"{terms['target'].item():.3f}")
        history["terms"].append({name: total / steps for name, total in sums.items()})
        history["epoch_seconds"].append(time.perf_counter() - tick)
        if progress:
            summary = " ".join(f"{k} {v:.4f}" for k, v in history["terms"][-1].items())
            tqdm.write(f"{settings.variant} epoch {epoch + 1}/{settings.epochs}: {summary}")
        save_checkpoint(
            {
                "encoder": backdoored.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "epoch": torch.tensor(epoch + 1),
            },
            checkpoint_path,
        )
        history_path.write_text(json.dumps(history, indent=1))

    save_encoder(final_path, backdoored.cpu().eval(), arch, width, mean, std)
    history["finished"] = True
    history_path.write_text(json.dumps(history, indent=1))
    return final_path
