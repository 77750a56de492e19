"""SimCLR pre-training of a CIFAR-style ResNet: the clean encoders the lab attacks.

Augmentations run on whole batches of tensors (one affine grid_sample for crop + flip, closed-form
colour jitter) because per-image PIL transforms dominate the step time on a 2-core CPU.

    pretrain_simclr(images_nhwc_uint8, out_dir) -> out_dir/encoder.safetensors

A run directory holds `checkpoint.pt` (written every epoch, so a killed run resumes where it
stopped), `history.json` (loss per epoch, kNN accuracy when measured) and the final encoder.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.architectures import ARCHITECTURES, build_architecture
from models.encoders import save_encoder
from training.checkpoint import save_checkpoint

ENCODER_FILE = "encoder.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------
# Batched augmentations on float images in [0, 1], x (N, 3, H, W).
# ----------------------------------------------------------------------------------------------


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """n uniform draws from the generator (on the generator's device), moved to `device`."""
    draws = torch.rand(n, generator=generator, device=generator.device)
    return (draws * (high - low) + low).to(device)


def random_resized_crop_flip(
    x: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    out_size: int | None = None,
) -> torch.Tensor:
    """Crop a random box (area fraction in `scale`, aspect 3/4..4/3), resize to `out_size`, flip half.

    out_size defaults to the input size; a smaller one makes pre-training cheaper on CPU (the conv
    cost scales with pixels), and since a crop of ~3/4 of the side resized to 3/4 of the size keeps
    objects at their apparent test-time scale, testing at full size loses little (FixRes effect).
    """
    n = x.shape[0]
    dev = x.device
    area = _uniform(n, scale[0], scale[1], generator, dev)
    ratio = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), generator, dev))
    # Box width/height as fractions of the side; affine_grid maps [-1, 1] to that box.
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = _uniform(n, -1, 1, generator, dev) * (1 - w)
    cy = _uniform(n, -1, 1, generator, dev) * (1 - h)
    flip = torch.where(_uniform(n, 0, 1, generator, dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    size = out_size or x.shape[-1]
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane, one linear map per image.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _gray(x: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_GRAY_WEIGHTS, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def color_jitter(
    x: torch.Tensor,
    generator: torch.Generator,
    strength: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
    p: float = 0.8,
) -> torch.Tensor:
    """Brightness, contrast, saturation, hue jitter (SimCLR's CIFAR strengths), each image w.p. `p`."""
    n, dev = x.shape[0], x.device
    b, c, s, hue = strength

    def factor(spread: float) -> torch.Tensor:
        return _uniform(n, 1 - spread, 1 + spread, generator, dev).view(n, 1, 1, 1)

    out = (x * factor(b)).clamp(0, 1)
    mean = _gray(out).mean(dim=(2, 3), keepdim=True)
    out = ((out - mean) * factor(c) + mean).clamp(0, 1)
    gray = _gray(out)
    out = ((out - gray) * factor(s) + gray).clamp(0, 1)
    angle = _uniform(n, -hue, hue, generator, dev) * 2 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(n, 3, 3, device=dev)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    mix = _YIQ_TO_RGB.to(dev) @ rotation @ _RGB_TO_YIQ.to(dev)  # (N, 3, 3)
    out = torch.einsum("nij,njhw->nihw", mix, out).clamp(0, 1)
    apply = (_uniform(n, 0, 1, generator, dev) < p).float().view(n, 1, 1, 1)
    return apply * out + (1 - apply) * x


def random_grayscale(x: torch.Tensor, generator: torch.Generator, p: float = 0.2) -> torch.Tensor:
    apply = (_uniform(x.shape[0], 0, 1, generator, x.device) < p).float().view(-1, 1, 1, 1)
    return apply * _gray(x).expand_as(x) + (1 - apply) * x


def simclr_view(x: torch.Tensor, generator: torch.Generator, out_size: int | None = None) -> torch.Tensor:
    """One SimCLR view of a batch: crop+flip, colour jitter (p 0.8), grayscale (p 0.2). [0,1] in/out."""
    cropped = random_resized_crop_flip(x, generator, out_size=out_size)
    return random_grayscale(color_jitter(cropped, generator), generator)


# ----------------------------------------------------------------------------------------------
# Model and loss.
# ----------------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """SimCLR's MLP head g: embedding (D) -> hidden -> out. Only used during pre-training."""

    def __init__(self, dim: int, hidden: int = 512, out: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def nt_xent_loss(p1: torch.Tensor, p2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent: each view's positive is its partner; the other 2N-2 views are negatives.

    p1, p2 (N, K) projections of the two views of the same N images.
    """
    z = F.normalize(torch.cat([p1, p2]), dim=1)  # (2N, K)
    logits = z @ z.t() / temperature
    n = p1.shape[0]
    logits.fill_diagonal_(float("-inf"))  # a view is not its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def normalize_batch(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[0,1] float (N, 3, H, W) -> the encoder's normalized input."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def to_unit_float(images_nhwc_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) numpy -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_nhwc_uint8)).permute(0, 3, 1, 2).float() / 255.0


# ----------------------------------------------------------------------------------------------
# Evaluation: weighted kNN top-1 (the usual SSL monitor: cosine similarity, k=200, T=0.1).
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def embed_images(
    encoder: nn.Module,
    images_nhwc_uint8: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    batch_size: int = 512,
) -> torch.Tensor:
    """Embeddings (N, D) on the CPU of uint8 NHWC images, encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in range(0, len(images_nhwc_uint8), batch_size):
        x = to_unit_float(images_nhwc_uint8[start : start + batch_size]).to(device)
        out.append(encoder(normalize_batch(x, mean, std)).float().cpu())
    encoder.train(was_training)
    return torch.cat(out)


def knn_top1(
    train_z: torch.Tensor,
    train_y: np.ndarray,
    test_z: torch.Tensor,
    test_y: np.ndarray,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Weighted kNN classification accuracy of test embeddings against labelled train embeddings."""
    train_z, test_z = F.normalize(train_z, dim=1), F.normalize(test_z, dim=1)
    train_labels = torch.as_tensor(train_y, dtype=torch.long)
    classes = int(max(train_labels.max().item(), int(np.max(test_y))) + 1)
    correct = 0
    for start in range(0, len(test_z), 1024):
        sim = test_z[start : start + 1024] @ train_z.t()
        top_sim, top_idx = sim.topk(min(k, len(train_z)), dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), classes).scatter_add_(1, train_labels[top_idx], weights)
        pred = votes.argmax(1).numpy()
        correct += int((pred == test_y[start : start + 1024]).sum())
    return correct / len(test_z)


# ----------------------------------------------------------------------------------------------
# Training loop.
# ----------------------------------------------------------------------------------------------


def _lr_at(step: int, total: int, warmup: int, base_lr: float) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_simclr(
    images_nhwc_uint8: np.ndarray,
    out_dir: str | Path,
    arch: str = "cifar_resnet18",
    width: int = 16,
    epochs: int = 65,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    resume: bool = True,
    seed: int = 0,
    lr: float = 0.3,
    weight_decay: float = 5e-4,
    temperature: float = 0.5,
    crop_size: int | None = None,
    knn_eval: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    knn_every: int = 0,
    progress: bool = True,
) -> Path:
    """SimCLR-train `arch` on the images; returns the path of the saved .safetensors encoder.

    images_nhwc_uint8: (N, H, W, 3) uint8. SGD with momentum, linear warm-up then cosine decay.
    Checkpoints every epoch to out_dir/checkpoint.pt and resumes from it when `resume`.
    knn_eval: optional (train_x, train_y, test_x, test_y) to record kNN top-1 every `knn_every`
    epochs and at the end (history.json). crop_size: the views' side in pixels (default: the
    images' own); the lab uses 24 on 32 px CIFAR to halve the CPU cost.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else default_device()
    final_path = out / ENCODER_FILE
    history_path = out / HISTORY_FILE
    if resume and final_path.is_file() and history_path.is_file():
        history = json.loads(history_path.read_text())
        if history.get("finished") and history.get("epochs") == epochs:
            return final_path

    spec = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    # channels_last: ~15% faster convolutions on CPU (oneDNN) and on GPU tensor cores.
    encoder = build_architecture(arch, width).to(device, memory_format=torch.channels_last)
    head = ProjectionHead(encoder.embedding_dim).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    generator = torch.Generator(device=device).manual_seed(seed)
    order_rng = np.random.default_rng(seed)
    history: dict = {"epochs": epochs, "loss": [], "knn_top1": {}, "epoch_seconds": [], "finished": False}
    start_epoch = 0
    checkpoint_path = out / CHECKPOINT_FILE
    if resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        encoder.load_state_dict(state["encoder"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"].cpu() if device.type == "cpu" else state["generator"])
        order_rng = np.random.default_rng(int(state["order_seed"]))
        start_epoch = int(state["epoch"])
        if history_path.is_file():
            history = json.loads(history_path.read_text())
            history["epochs"] = epochs

    n = len(images_nhwc_uint8)
    steps_per_epoch = n // batch_size  # drop the last partial batch: NT-Xent wants full batches
    if steps_per_epoch == 0:
        raise ValueError(f"{n} images are fewer than one batch of {batch_size}; lower --batch-size")
    total_steps, warmup = epochs * steps_per_epoch, min(2, epochs) * steps_per_epoch // 2 or 1
    data = torch.from_numpy(np.ascontiguousarray(images_nhwc_uint8)).permute(0, 3, 1, 2)  # uint8 NCHW view
    encoder.train()
    head.train()
    for epoch in range(start_epoch, epochs):
        tick = time.perf_counter()
        # A per-epoch seed drawn from order_rng keeps the data order reproducible across a resume.
        epoch_seed = int(order_rng.integers(2**31))
        perm = np.random.default_rng(epoch_seed).permutation(n)
        losses = []
        bar = tqdm(
            range(steps_per_epoch), desc=f"simclr {epoch + 1}/{epochs}", disable=not progress, leave=False
        )
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(epoch * steps_per_epoch + step, total_steps, warmup, lr)
            idx = torch.from_numpy(perm[step * batch_size : (step + 1) * batch_size])
            x = data[idx].to(device).float() / 255.0
            v1 = normalize_batch(simclr_view(x, generator, crop_size), spec.mean, spec.std)
            v2 = normalize_batch(simclr_view(x, generator, crop_size), spec.mean, spec.std)
            views = torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last)
            projections = head(encoder(views))
            loss = nt_xent_loss(projections[: len(x)], projections[len(x) :], temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        history["loss"].append(float(np.mean(losses)))
        history["epoch_seconds"].append(time.perf_counter() - tick)
        last = epoch + 1 == epochs
        if knn_eval is not None and (last or (knn_every and (epoch + 1) % knn_every == 0)):
            history["knn_top1"][str(epoch + 1)] = simclr_knn(encoder, knn_eval, spec.mean, spec.std, device)
        if progress:
            knn = history["knn_top1"].get(str(epoch + 1))
            tqdm.write(
                f"simclr epoch {epoch + 1}/{epochs} loss {history['loss'][-1]:.4f} "
                f"({history['epoch_seconds'][-1]:.0f}s)"
                + (f" kNN top-1 {knn:.4f}" if knn is not None else "")
            )
        state = {
            "encoder": encoder.state_dict(),
            "head": head.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "order_seed": torch.tensor(int(order_rng.integers(2**31))),
            "epoch": torch.tensor(epoch + 1),
        }
        # The next epoch's order comes from the seed just stored, whether or not we resume.
        order_rng = np.random.default_rng(int(state["order_seed"]))
        save_checkpoint(state, checkpoint_path)
        history_path.write_text(json.dumps(history, indent=1))

    save_encoder(final_path, encoder.cpu(), arch, width, spec.mean, spec.std)
    encoder.to(device)
    history["finished"] = True
    history.update(arch=arch, width=width, seed=seed, batch_size=batch_size, lr=lr, crop_size=crop_size)
    history_path.write_text(json.dumps(history, indent=1))
    return final_path


def simclr_knn(
    encoder: nn.Module,
    knn_eval: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
) -> float:
    train_x, train_y, test_x, test_y = knn_eval
    train_z = embed_images(encoder, train_x, mean, std, device)
    test_z = embed_images(encoder, test_x, mean, std, device)
    return knn_top1(train_z, train_y, test_z, test_y)
