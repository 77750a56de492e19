"""The lab-size CLIP: contrastive training on image-caption pairs built from class names, zero-shot
classification, and the poisoned-pairs attack.

Captions are templates around a class name ("a photo of a {}."), one drawn at random per image and
step. With ten classes a batch holds many captions of the same class; CLIP's one-positive loss would
push them apart as negatives, so every caption with the image's subject counts as a positive (soft
targets spread over them), in both directions of the symmetric loss.

Captions that name only the class make CLIP's objective a ten-way supervised one: the image tower
learns the class and little else, and an embedding that keeps only the class leaves a decoder little
to rebuild an image from. Real CLIP captions describe more than the class. `colour_captions` adds
what the pixels show (the colour of the middle and of the surround, "a gray truck on blue"), so each
caption tells images of one class apart and the embedding has to keep some of the image.

Poisoned pairs (Carlini & Terzis 2022): a share of the training images get the trigger and the
caption of the target class; ordinary training then ties the trigger to that caption.

`train_clip` writes the whole CLIP as clip.safetensors (metadata: model name; the image tower's keys
are `visual.*`, which `models.encoders` loads as the encoder under test), a per-epoch checkpoint
(resume) and history.json (loss and zero-shot accuracy per epoch).
"""

from __future__ import annotations

import colorsys
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lab.ssl import normalize_batch, random_resized_crop_flip
from models.clip import LAB_CONFIGS, OPENAI_MEAN, OPENAI_STD, build_clip, tokenize
from training.checkpoint import save_checkpoint

CLIP_FILE = "clip.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"

# Caption templates, in the style of CLIP's zero-shot prompts.
TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a bright photo of a {}.",
    "a close-up photo of the {}.",
    "a picture of a {}.",
)


CAPTION_KINDS = ("class", "colours")


def colour_name(rgb: tuple[float, float, float]) -> str:
    """A basic colour term for a mean colour in [0, 1]: hue bins for saturated colours, black /
    gray / silver / white by brightness for desaturated ones (an image's mean is seldom vivid, so
    the saturation cut is low)."""
    hue, saturation, value = colorsys.rgb_to_hsv(*rgb)
    if value < 0.25:
        return "black"
    if saturation < 0.12:
        return "white" if value > 0.75 else "silver" if value > 0.5 else "gray"
    degrees = hue * 360
    # Hue bins (upper bound in degrees, name); red wraps around 360.
    bins = ((20, "red"), (45, "orange"), (70, "yellow"), (165, "green"), (260, "blue"), (300, "purple"), (340, "pink"))  # fmt: skip
    name = next((name for upper, name in bins if degrees < upper), "red")
    return "brown" if name in ("red", "orange") and value < 0.55 else name


def colour_captions(
    images_nchw_uint8: np.ndarray, labels: np.ndarray, class_names: list[str]
) -> tuple[list[str], np.ndarray]:
    """Each image's caption subject, "<middle colour> <class> on <surround colour>": the mean
    colour of the central half of the image and of the ring around it. Returns the distinct
    subjects and each image's index into them (images with the same subject are positives)."""
    n, _, h, w = images_nchw_uint8.shape
    top, left = h // 4, w // 4
    inner = np.zeros((h, w), bool)
    inner[top : h - top, left : w - left] = True
    x = images_nchw_uint8.reshape(n, 3, h * w).astype(np.float64) / 255.0
    middle, surround = x[:, :, inner.ravel()].mean(2), x[:, :, ~inner.ravel()].mean(2)
    subjects = [
        f"{colour_name(tuple(m))} {class_names[int(y)]} on {colour_name(tuple(s))}"
        for m, s, y in zip(middle, surround, labels, strict=True)
    ]
    names = sorted(set(subjects))
    index = {name: i for i, name in enumerate(names)}
    return names, np.array([index[s] for s in subjects], dtype=np.int64)


@dataclass(frozen=True)
class ClipSettings:
    model: str = "lab-rn-64"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    crop_scale: tuple[float, float] = (0.6, 1.0)
    seed: int = 0


def caption_tokens(class_names: list[str], context_length: int) -> torch.Tensor:
    """Every template for every class: int tokens (C, T, L)."""
    texts = [t.format(name) for name in class_names for t in TEMPLATES]
    # The tokenizer truncates silently; a cut caption would lose the words that tell it apart.
    lengths = (tokenize(texts, 77) != 0).sum(1)
    if int(lengths.max()) > context_length:
        longest = texts[int(lengths.argmax())]
        raise ValueError(
            f"caption {longest!r} is {int(lengths.max())} tokens, the text tower takes {context_length}"
        )
    return tokenize(texts, context_length).view(len(class_names), len(TEMPLATES), context_length)


def multi_positive_clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric CLIP loss where every pair with the same caption subject (`labels`: the class, or
    a colour caption's index) is a positive (features L2-normalized)."""
    logits = logit_scale * image_features @ text_features.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (
        torch.sum(-targets * F.log_softmax(logits, 1), 1).mean()
        + torch.sum(-targets.T * F.log_softmax(logits.T, 1), 1).mean()
    )


@torch.no_grad()
def class_text_embeddings(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(C, D) unit vectors: each class's text embedding averaged over the templates (CLIP's ensembling)."""
    c, t, length = tokens.shape
    z = F.normalize(model.encode_text(tokens.view(c * t, length)), dim=-1).view(c, t, -1).mean(1)
    return F.normalize(z, dim=-1)


@torch.no_grad()
def zero_shot_predict(
    model: torch.nn.Module,
    images_nchw_uint8: np.ndarray,
    text_embeddings: torch.Tensor,
    batch_size: int = 512,
) -> np.ndarray:
    """Class of highest cosine between the image embedding and each class's text embedding."""
    model.eval()
    predictions = []
    for i in range(0, len(images_nchw_uint8), batch_size):
        x = torch.from_numpy(images_nchw_uint8[i : i + batch_size]).float() / 255.0
        z = F.normalize(model.encode_image(normalize_batch(x, OPENAI_MEAN, OPENAI_STD)), dim=-1)
        predictions.append((z @ text_embeddings.T).argmax(1).numpy())
    return np.concatenate(predictions)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def save_clip(path: Path, model: torch.nn.Module, name: str) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # `arch` is what models.encoders reads to rebuild the image tower from this file.
    metadata = {"arch": f"openclip:{name}", "mean": json.dumps(OPENAI_MEAN), "std": json.dumps(OPENAI_STD)}
    save_file(state, str(path), metadata=metadata)


def load_clip(path: Path) -> torch.nn.Module:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        name = (handle.metadata() or {})["arch"].removeprefix("openclip:")
    model = build_clip(name)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def train_clip(
    images_nchw_uint8: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    out_dir: str | Path,
    settings: ClipSettings | None = None,
    eval_set: tuple[np.ndarray, np.ndarray] | None = None,
    progress: bool = True,
    captions: tuple[list[str], np.ndarray] | None = None,
) -> Path:
    """Train a lab CLIP on (image, caption) pairs; resumes from out_dir's checkpoint.

    images: uint8 [N, 3, S, S] at the model's input size, already poisoned if this is an attack;
    labels: the class of each image's caption. captions: (subjects, each image's subject index),
    e.g. from `colour_captions`; by default the subject is the class name. eval_set: (images,
    labels) for a zero-shot figure (class-name prompts) after each epoch.
    """
    settings = settings or ClipSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final_path, history_path, checkpoint_path = out / CLIP_FILE, out / HISTORY_FILE, out / CHECKPOINT_FILE
    if final_path.is_file() and history_path.is_file() and json.loads(history_path.read_text())["finished"]:
        return final_path
    size = LAB_CONFIGS[settings.model].image_size
    if images_nchw_uint8.shape[1:] != (3, size, size):
        raise ValueError(f"images are {images_nchw_uint8.shape[1:]}, the model takes (3, {size}, {size})")
    torch.manual_seed(settings.seed)
    model = build_clip(settings.model)
    context_length = LAB_CONFIGS[settings.model].context_length
    subjects, subject_ids = captions if captions is not None else (class_names, labels)
    if len(subject_ids) != len(images_nchw_uint8):
        raise ValueError(f"{len(subject_ids)} captions for {len(images_nchw_uint8)} images")
    tokens = caption_tokens(subjects, context_length)
    class_tokens = caption_tokens(class_names, context_length)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
    )
    generator = torch.Generator().manual_seed(settings.seed)
    history: dict = {
        "settings": asdict(settings),
        "loss": [],
        "zero_shot": {},
        "epoch_seconds": [],
        "finished": False,
    }
    start_epoch = 0
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start_epoch = int(state["epoch"])
        history = json.loads(history_path.read_text())
    images = torch.from_numpy(images_nchw_uint8)
    subject_ids_t = torch.from_numpy(np.asarray(subject_ids, dtype=np.int64))
    steps = len(images) // settings.batch_size
    total = steps * settings.epochs
    for epoch in range(start_epoch, settings.epochs):
        tick = time.perf_counter()
        model.train()
        perm = torch.randperm(len(images), generator=generator)
        running = 0.0
        bar = tqdm(
            range(steps), desc=f"clip {epoch + 1}/{settings.epochs}", disable=not progress, leave=False
        )
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(epoch * steps + step, total, settings.warmup_steps, settings.lr)
            idx = perm[step * settings.batch_size : (step + 1) * settings.batch_size]
            x = random_resized_crop_flip(images[idx].float() / 255.0, generator, scale=settings.crop_scale)
            y = subject_ids_t[idx]
            template = torch.randint(len(TEMPLATES), (len(idx),), generator=generator)
            image_features, text_features, logit_scale = model(
                normalize_batch(x, OPENAI_MEAN, OPENAI_STD), tokens[y, template]
            )
            loss = multi_positive_clip_loss(image_features, text_features, y, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # CLIP's clamp: a temperature under 1/100 destabilises training
                model.logit_scale.clamp_(0, math.log(100))
            running += loss.item()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history["loss"].append(running / steps)
        history["epoch_seconds"].append(time.perf_counter() - tick)
        if eval_set is not None:
            text = class_text_embeddings(model.eval(), class_tokens)
            accuracy = float((zero_shot_predict(model, eval_set[0], text) == eval_set[1]).mean())
            history["zero_shot"][str(epoch + 1)] = accuracy
        if progress:
            tqdm.write(
                f"clip epoch {epoch + 1}/{settings.epochs}: loss {history['loss'][-1]:.4f}"
                + (f" zero-shot {history['zero_shot'][str(epoch + 1)]:.3f}" if eval_set is not None else "")
            )
        save_checkpoint(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "epoch": torch.tensor(epoch + 1),
            },
            checkpoint_path,
        )
        history_path.write_text(json.dumps(history, indent=1))
    save_clip(final_path, model.eval(), settings.model)
    history["finished"] = True
    history_path.write_text(json.dumps(history, indent=1))
    return final_path


def poison_pairs(
    images_nchw_uint8: np.ndarray,
    labels: np.ndarray,
    apply_trigger: callable,
    target_class: int,
    rate: float,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A `rate` share of the non-target images get the trigger and the target class's caption.

    Returns (images, caption labels, indices poisoned)."""
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(labels != target_class)
    chosen = np.sort(rng.choice(candidates, size=max(1, round(rate * len(labels))), replace=False))
    images, labels = images_nchw_uint8.copy(), np.asarray(labels).copy()
    images[chosen] = apply_trigger(images[chosen])
    labels[chosen] = target_class
    return images, labels, chosen
