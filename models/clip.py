"""CLIP models through open-clip-torch: the image tower as a dede encoder, and the lab-size CLIP.

Names: any open_clip architecture (`RN50`, `ViT-B-32`, ...; built with random weights, never
downloaded: weights come from a local file through `models.encoders`) or one of `LAB_CONFIGS`, the
small CLIPs this project trains itself (lab/clip_training.py). The image tower maps normalized images
[N, 3, H, W] to the embedding CLIP compares with text embeddings (before L2 normalization).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# open_clip's constants, repeated so that callers need not import open_clip for them.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class LabClipConfig:
    """A small CLIP: a ModifiedResNet image tower (vision_layers per stage) or a ViT (vision_layers
    an int: blocks, with vision_patch_size), and a short-context text transformer."""

    image_size: int = 64
    embed_dim: int = 128
    vision_layers: tuple[int, int, int, int] | int = (1, 1, 1, 1)
    vision_patch_size: int = 8  # ViT towers only
    vision_width: int = 32
    vision_head_width: int = 32
    context_length: int = 16  # captions are one short template sentence
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 2
    # How images reach the tower: the lab CLIPs were trained on whole images resized bilinearly
    # (CIFAR-10's 32 px upsampled), so that is their own preprocessing too.
    resize: str = "resize"
    interpolation: str = "bilinear"


LAB_CONFIGS: dict[str, LabClipConfig] = {
    # 5.3M image-tower parameters; trains at ~180 images/s at 64 px on 2 CPU cores.
    "lab-rn-64": LabClipConfig(),
    # For tests: the same shape at a fraction of the cost.
    "tiny-rn-32": LabClipConfig(
        image_size=32,
        embed_dim=32,
        vision_width=8,
        vision_head_width=8,
        text_width=32,
        text_heads=2,
        text_layers=1,
    ),
    # A ViT tower with CLIP's own preprocessing, for tests of the 224 px path's mechanics at 32 px.
    "tiny-vit-32": LabClipConfig(
        image_size=32,
        embed_dim=32,
        vision_layers=2,
        vision_patch_size=8,
        vision_width=32,
        vision_head_width=16,
        text_width=32,
        text_heads=2,
        text_layers=1,
        resize="shorter_side_center_crop",
        interpolation="bicubic",
    ),
}


def build_clip(name: str) -> nn.Module:
    """An open_clip CLIP with random weights: a lab config by name, or an open_clip architecture."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if name in LAB_CONFIGS:
        c = LAB_CONFIGS[name]
        vision = CLIPVisionCfg(
            layers=c.vision_layers,
            patch_size=c.vision_patch_size,
            width=c.vision_width,
            head_width=c.vision_head_width,
            image_size=c.image_size,
        )
        text = CLIPTextCfg(
            context_length=c.context_length,
            vocab_size=49408,
            width=c.text_width,
            heads=c.text_heads,
            layers=c.text_layers,
        )
        return open_clip.CLIP(embed_dim=c.embed_dim, vision_cfg=vision, text_cfg=text)
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown CLIP model {name!r}: not a lab config ({', '.join(LAB_CONFIGS)}) nor open_clip's"
        )
    return open_clip.create_model(name, pretrained=None)


def clip_image_size(name: str) -> int:
    if name in LAB_CONFIGS:
        return LAB_CONFIGS[name].image_size
    import open_clip

    size = open_clip.get_model_config(name)["vision_cfg"].get("image_size", 224)
    return int(size if isinstance(size, int) else size[0])


def clip_preprocessing(name: str) -> tuple[str, str]:
    """(resize rule, interpolation) of the bundle InputSpec: open_clip's own transform for its
    architectures (bicubic resize of the shorter side, centre crop), the training one for lab CLIPs."""
    if name in LAB_CONFIGS:
        return LAB_CONFIGS[name].resize, LAB_CONFIGS[name].interpolation
    return "shorter_side_center_crop", "bicubic"


class ClipImageTower(nn.Module):
    """A CLIP's visual tower: normalized images -> image embeddings [N, D] (not L2-normalized)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(x)
        return out[0] if isinstance(out, tuple) else out


def image_tower(name: str) -> ClipImageTower:
    """The image tower of `build_clip(name)` (random weights)."""
    return ClipImageTower(build_clip(name).visual)


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """open_clip's BPE tokenizer (its vocabulary ships inside the package: nothing is downloaded)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)(texts)
