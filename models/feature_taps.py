"""The encoder's own feature maps at chosen stages: where the feature-space discrepancy is measured.

DeDe's discrepancy is between an input and its rebuild from the input's embedding. Measured in
pixels, it mixes what the backdoor does (the rebuild shows the attacker's target, not the input)
with how hard any image is to rebuild pixel for pixel; measured in the encoder's own feature maps,
it compares what the encoder sees in the input with what it sees in the rebuild.

Which stages, by a rule fixed without any triggered image: the encoder's stages at relative depths
1/2, 3/4 and 1 of its stage sequence (`default_stages`):
  - ResNets (CIFAR, torchvision, CLIP's modified ResNet): layer2, layer3, layer4 of layer1-4;
  - transformer towers (open_clip ViT `resblocks`, Hugging Face CLIP `layers`): the blocks at those
    depths (12 blocks: 6th, 9th, 12th).
Any other torch encoder, and every ONNX black box, names its stages (tensor names) itself.
"""

from __future__ import annotations

import re

import torch
from torch import nn

RELATIVE_DEPTHS = (1 / 2, 3 / 4, 1.0)


def stage_module(encoder: nn.Module, stage: str) -> nn.Module:
    """The module named `stage`, or else the only one whose dotted name ends with it."""
    modules = dict(encoder.named_modules())
    if stage in modules:
        return modules[stage]
    ending = [name for name in modules if name.endswith(f".{stage}")]
    if len(ending) == 1:
        return modules[ending[0]]
    if ending:
        raise ValueError(f"stage {stage!r} is ambiguous in this encoder: {', '.join(ending)}")
    raise ValueError(f"the encoder has no stage named {stage}; it has {', '.join(list(modules)[1:8])}, ...")


def _pick(sequence: list[str]) -> list[str]:
    n = len(sequence)
    picked = [sequence[max(0, round(d * n) - 1)] for d in RELATIVE_DEPTHS]
    return list(dict.fromkeys(picked))  # a short sequence may pick one stage twice


def default_stages(encoder: nn.Module) -> list[str]:
    """The rule above, or a ValueError that says how to name stages by hand."""
    names = [name for name, _ in encoder.named_modules()]
    resnet = [f"layer{i}" for i in range(1, 5)]
    if all(any(n == s or n.endswith(f".{s}") for n in names) for s in resnet):
        return _pick(resnet)
    for container in (r"(.*\.)?resblocks", r"(.*\.)?encoder\.layers", r"(.*\.)?blocks"):
        blocks = sorted(
            (n for n in names if re.fullmatch(container + r"\.\d+", n)),
            key=lambda n: int(n.rsplit(".", 1)[1]),
        )
        if len(blocks) >= 2:
            return _pick(blocks)
    raise ValueError(
        "cannot tell this encoder's stages (not a ResNet with layer1-4 nor a transformer with numbered "
        "blocks): name them with --feature-stages, e.g. --feature-stages layer2,layer3"
    )


def _first_tensor(output: object) -> torch.Tensor:
    while isinstance(output, tuple | list):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"a feature stage returned {type(output).__name__}, not a tensor")
    return output


class TappedEncoder(nn.Module):
    """encoder(normalized images) -> (embedding, [feature map at each stage]).

    Forward hooks capture the stage outputs as the encoder runs; they are plain Python, which the
    ONNX exporter (torch.export, non-strict) traces through, so the exported graph holds the taps.
    """

    def __init__(self, encoder: nn.Module, stages: list[str]) -> None:
        super().__init__()
        if not stages:
            raise ValueError("a tapped encoder needs at least one stage")
        self.encoder = encoder
        self.stages = list(stages)
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks = [
            stage_module(encoder, stage).register_forward_hook(self._capture_hook(stage)) for stage in stages
        ]

    def _capture_hook(self, stage: str):  # noqa: ANN202 - a torch hook
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            self._captured[stage] = _first_tensor(output)

        return hook

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._captured.clear()
        embedding = self.encoder(images)
        features = [self._captured[stage] for stage in self.stages]
        self._captured.clear()
        for stage, feature in zip(self.stages, features, strict=True):
            if feature.dim() < 2 or feature.shape[0] != images.shape[0]:
                raise ValueError(
                    f"stage {stage} gives a {tuple(feature.shape)} tensor for {images.shape[0]} images: "
                    "a feature stage must put the batch first"
                )
        return embedding, features

    def remove(self) -> None:
        """Take the hooks off the encoder (it is shared with other detectors)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def stage_discrepancy(of_input: torch.Tensor, of_rebuild: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per image between two batch-first feature maps of one stage -> (N,)."""
    return (of_input.float() - of_rebuild.float()).pow(2).flatten(1).mean(dim=1)
