"""Fit the DeDe decoder for a frozen encoder on auxiliary images.

A run directory holds everything a later step needs:
  run.json               how to rebuild the encoder, the decoder config, the fit settings
  embeddings.npy         the frozen encoder's embeddings of the training images (computed once)
  checkpoint.pt          decoder + optimizer + schedule after the last finished epoch (resume)
  log.csv                loss per epoch (train, at the training mask; val, at the test-time mask)
  decoder.safetensors    the fitted decoder
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from models.decoder import DecoderConfig, DeDeDecoder, fixed_visible_patches, preset_config, training_loss
from models.detector import Detector, DetectorHead, Normalize
from models.encoders import LoadedEncoder, encoder_from_args
from training.checkpoint import save_checkpoint

RUN_FILE = "run.json"
CHECKPOINT = "checkpoint.pt"
DECODER_FILE = "decoder.safetensors"
LOG_FILE = "log.csv"
EMBEDDINGS_FILE = "embeddings.npy"


class RunError(Exception):
    """A run directory is missing a step or does not match the requested settings."""


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def embed_images(
    encoder: LoadedEncoder,
    images: np.ndarray,
    device: torch.device,
    batch_size: int = 256,
    desc: str = "embed",
) -> np.ndarray:
    """uint8 [N, 3, H, W] -> float32 embeddings [N, D], in batches with a progress bar."""
    if encoder.module is not None:
        encoder.module.to(device)
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        out.append(encoder.embed(batch).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.identity.embedding_dim), np.float32)


@dataclass
class FitSettings:
    preset: str = "lab"
    epochs: int | None = None  # None: the preset's default
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    warmup_epochs: int = 1
    val_fraction: float = 0.05
    seed: int = 0
    data_source: str = ""
    poison_rate: float = 0.0
    config_overrides: dict | None = None


DEFAULT_EPOCHS = {"paper": 200, "lab": 12, "tiny": 2}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)  # atomic: a crash never leaves half a file


def fit_decoder(
    encoder: LoadedEncoder,
    images: np.ndarray,
    run_dir: Path,
    settings: FitSettings | None = None,
    device: str | None = None,
    resume: bool = True,
    poison: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Path:
    """Train the decoder with the encoder frozen; returns the path of the fitted decoder.

    `images` are the auxiliary images, uint8 [N, 3, H, W] at the encoder's input size. With
    `poison` and `settings.poison_rate`, that fraction of them is triggered first (emulating a
    slightly poisoned auxiliary set). Checkpoints every epoch; `resume` continues a killed run.
    """
    settings = settings or FitSettings()
    run_dir.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    torch.manual_seed(settings.seed)
    height, width = encoder.identity.input_size
    if height != width:
        raise RunError(f"the decoder needs square inputs; the encoder takes {height}x{width}")
    config = preset_config(settings.preset, height, **(settings.config_overrides or {}))
    epochs = settings.epochs or DEFAULT_EPOCHS.get(settings.preset, 30)

    run_info = {
        "encoder": encoder.load_args,
        "encoder_identity": encoder.identity.model_dump(mode="json"),
        "preset": settings.preset,
        "decoder_config": config.to_dict(),
        "fit": {**settings.__dict__, "epochs": epochs, "n_images": int(len(images)), "device": dev.type},
        "status": "fitting",
    }
    run_file = run_dir / RUN_FILE
    if resume and run_file.exists():
        previous = json.loads(run_file.read_text())
        if (
            previous.get("decoder_config") != run_info["decoder_config"]
            or previous.get("encoder") != encoder.load_args
        ):
            raise RunError(f"{run_dir} holds a run with another encoder or decoder config; use a new --out")
        if previous.get("status") == "fitted" and (run_dir / DECODER_FILE).exists():
            return run_dir / DECODER_FILE
    _write_json(run_file, run_info)

    rng = np.random.default_rng(settings.seed)
    if poison is not None and settings.poison_rate > 0:
        chosen = rng.choice(len(images), int(round(settings.poison_rate * len(images))), replace=False)
        images = images.copy()
        images[chosen] = poison(images[chosen])

    embeddings_path = run_dir / EMBEDDINGS_FILE
    if resume and embeddings_path.exists() and len(np.load(embeddings_path, mmap_mode="r")) == len(images):
        embeddings = np.load(embeddings_path)
    else:
        embeddings = embed_images(encoder, images, dev, desc="embed aux images")
        np.save(embeddings_path, embeddings)

    order = rng.permutation(len(images))
    n_val = max(1, int(len(images) * settings.val_fraction)) if len(images) > 20 else 0
    val_idx, train_idx = order[:n_val], order[n_val:]

    decoder = DeDeDecoder(config, encoder.identity.embedding_dim).to(dev)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / settings.batch_size)
    total_steps, warmup_steps = epochs * steps_per_epoch, settings.warmup_epochs * steps_per_epoch

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start_epoch = 0
    checkpoint_path = run_dir / CHECKPOINT
    if resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=dev, weights_only=True)
        decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
    elif (run_dir / LOG_FILE).exists():
        (run_dir / LOG_FILE).unlink()

    images_t = torch.from_numpy(images)
    embeddings_t = torch.from_numpy(embeddings)
    normalize = Normalize(encoder.mean, encoder.std).to(dev)
    use_amp = dev.type == "cuda"
    generator = torch.Generator().manual_seed(settings.seed)

    epoch_bar = tqdm(
        range(start_epoch, epochs), desc="fit decoder", unit="epoch", initial=start_epoch, total=epochs
    )
    for epoch in epoch_bar:
        started = time.time()
        decoder.train()
        generator.manual_seed(settings.seed * 100_003 + epoch)  # resumable: the epoch fixes the order
        perm = train_idx[torch.randperm(len(train_idx), generator=generator).numpy()]
        total, count = 0.0, 0
        for start in tqdm(range(0, len(perm), settings.batch_size), desc=f"epoch {epoch + 1}", leave=False):
            idx = torch.from_numpy(perm[start : start + settings.batch_size])
            x = normalize(images_t[idx].to(dev))
            z = embeddings_t[idx].to(dev)
            visible = decoder.random_visible(len(idx), generator)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                pred = decoder(x, z, visible)
            loss = training_loss(pred.float(), x, visible, config.patch_size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        train_loss = total / max(1, count)
        val_loss = _val_loss(decoder, images_t, embeddings_t, val_idx, normalize, config, dev)
        seconds = time.time() - started
        _append_log(run_dir / LOG_FILE, epoch + 1, train_loss, val_loss, seconds)
        epoch_bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        save_checkpoint(
            {
                "decoder": decoder.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
            },
            checkpoint_path,
        )

    decoder_path = run_dir / DECODER_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}, str(decoder_path))
    run_info["status"] = "fitted"
    _write_json(run_file, run_info)
    return decoder_path


@torch.no_grad()
def _val_loss(
    decoder: DeDeDecoder,
    images: torch.Tensor,
    embeddings: torch.Tensor,
    val_idx: np.ndarray,
    normalize: torch.nn.Module,
    config: DecoderConfig,
    dev: torch.device,
) -> float:
    """Per-pixel squared error at the fixed TEST-time mask: what the detector will score."""
    if len(val_idx) == 0:
        return float("nan")
    decoder.eval()
    visible_list = fixed_visible_patches(config)
    total = 0.0
    for start in range(0, len(val_idx), 512):
        idx = torch.from_numpy(val_idx[start : start + 512])
        x = normalize(images[idx].to(dev))
        visible = torch.tensor(visible_list, dtype=torch.long, device=dev).view(1, -1).expand(len(idx), -1)
        pred = decoder(x, embeddings[idx].to(dev), visible)
        total += training_loss(pred.float(), x, visible, config.patch_size).item() * len(idx)
    return total / len(val_idx)


def _append_log(path: Path, epoch: int, train_loss: float, val_loss: float, seconds: float) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(["epoch", "train_loss", "val_loss_test_mask", "seconds"])
        writer.writerow([epoch, f"{train_loss:.6f}", f"{val_loss:.6f}", f"{seconds:.2f}"])


@dataclass
class FittedRun:
    run_dir: Path
    info: dict
    encoder: LoadedEncoder
    decoder: DeDeDecoder
    config: DecoderConfig

    def detector(self, score_kind: str = "sse") -> Detector:
        """The fused torch detector (needs a torch encoder; ONNX encoders use `head`)."""
        if self.encoder.module is None:
            raise RunError("the encoder is an ONNX black box: use run.head() with its embeddings")
        return Detector(self.encoder.module, self.head(score_kind)).eval()

    def head(self, score_kind: str = "sse") -> DetectorHead:
        visible = fixed_visible_patches(self.config)
        return DetectorHead(self.decoder, visible, self.encoder.mean, self.encoder.std, score_kind).eval()


def load_run(run_dir: Path) -> FittedRun:
    """A fitted run: its encoder rebuilt from the recorded arguments and its decoder's weights."""
    run_file, decoder_file = run_dir / RUN_FILE, run_dir / DECODER_FILE
    if not run_file.exists():
        raise RunError(f"{run_dir} is not a dede run (no {RUN_FILE}); make one with `dede fit`")
    info = json.loads(run_file.read_text())
    if info.get("status") != "fitted" or not decoder_file.exists():
        raise RunError(
            f"{run_dir}: the fit has not finished; run `dede fit ... --out {run_dir}` to resume it"
        )
    encoder = encoder_from_args(info["encoder"])
    recorded, actual = info["encoder_identity"].get("sha256"), encoder.identity.sha256
    if recorded != actual:
        raise RunError(f"{run_dir}: the encoder file changed since the fit (sha256 {actual} != {recorded})")
    config = DecoderConfig(**info["decoder_config"])
    decoder = DeDeDecoder(config, encoder.identity.embedding_dim)
    decoder.load_state_dict(load_file(str(decoder_file)))
    decoder.eval()
    return FittedRun(run_dir, info, encoder, decoder, config)
