"""The encoder architectures a state dict can be loaded onto: CIFAR-style ResNets (3x3 stem, no
max-pool, base width as a parameter), torchvision's ImageNet ResNets and open_clip image towers
(`openclip:<name>`), each with its input size, normalization and resize rule. The loaders that put
weights on them are in models/encoders.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderLoadError(Exception):
    """The encoder file or spec cannot be loaded; the message says what to change."""


# ----------------------------------------------------------------------------------------------
# CIFAR-style ResNet: 3x3 stem, no max-pool, base width as a parameter (64 = the usual network).
# ----------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * 4:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


_CIFAR_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class CifarResNet(nn.Module):
    """x [N, 3, H, W] (normalized) -> features [N, 8 * width * expansion] after global pooling."""

    def __init__(self, depth: int = 18, width: int = 64) -> None:
        super().__init__()
        if depth not in _CIFAR_DEPTHS:
            raise EncoderLoadError(f"CIFAR ResNet depth {depth} is not one of {sorted(_CIFAR_DEPTHS)}")
        block, counts = _CIFAR_DEPTHS[depth]
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, in_planes = [], width
        for stage, count in enumerate(counts):
            planes, stride = width * 2**stage, 1 if stage == 0 else 2
            blocks = []
            for i in range(count):
                blocks.append(block(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * block.expansion
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.embedding_dim = in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def _torchvision_resnet(depth: int) -> nn.Module:
    import torchvision

    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    net.embedding_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


@dataclass(frozen=True)
class Architecture:
    build: Callable[[int], nn.Module]  # width -> module (torchvision ignores width)
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "resize"  # models.bundle.InputSpec's rule and interpolation for this encoder
    interpolation: str = "bilinear"


ARCHITECTURES: dict[str, Architecture] = {
    **{
        f"cifar_resnet{d}": Architecture(
            build=lambda w, d=d: CifarResNet(d, w), input_size=(32, 32), mean=CIFAR_MEAN, std=CIFAR_STD
        )
        for d in _CIFAR_DEPTHS
    },
    **{
        f"resnet{d}": Architecture(
            build=lambda w, d=d: _torchvision_resnet(d),
            input_size=(224, 224),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
        for d in (18, 34, 50)
    },
}


OPENCLIP_PREFIX = "openclip:"  # `openclip:RN50`, `openclip:ViT-B-32`, `openclip:lab-rn-64` (models/clip.py)


def _openclip_architecture(arch: str) -> Architecture:
    """A CLIP image tower; its keys are `visual.*`, so a whole CLIP's state dict loads onto it (the
    text tower's keys are dropped as unknown)."""
    from models.clip import OPENAI_MEAN, OPENAI_STD, clip_image_size, clip_preprocessing, image_tower

    name = arch.removeprefix(OPENCLIP_PREFIX)
    size = clip_image_size(name)
    resize, interpolation = clip_preprocessing(name)
    return Architecture(
        build=lambda _w: image_tower(name),
        input_size=(size, size),
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        resize=resize,
        interpolation=interpolation,
    )


def architecture(arch: str) -> Architecture | None:
    if arch.startswith(OPENCLIP_PREFIX):
        return _openclip_architecture(arch)
    return ARCHITECTURES.get(arch)


def build_architecture(arch: str, width: int = 64) -> nn.Module:
    if arch.startswith(OPENCLIP_PREFIX):
        return _openclip_architecture(arch).build(width)
    if arch not in ARCHITECTURES:
        raise EncoderLoadError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch].build(width)
