"""The fused detector: uint8 images -> normalize -> frozen encoder -> DeDe decoder -> score.

This is the module that is exported as ONE ONNX graph, so the service runs exactly what was
calibrated. The test-time visible patches are a fixed buffer (deterministic scores).

Two decoder families rebuild the image (both in the encoder's normalized pixel space): the MAE one
(`models/decoder.py`, from the embedding plus the fixed visible patches, none at the default test
mask) and the convolutional one (`models/conv_decoder.py`, from the embedding alone).

Scores, all of them DeDe's reconstruction discrepancy between the input and its rebuild:
  sse        squared error summed over the (masked) pixels, in normalized pixel space (the method's);
  max_patch  the worst patch's squared error (a local trigger changes few patches, which a sum over
             the whole image can dilute);
  feature    the discrepancy at several depths: the input's pixels against the rebuild's at full
             resolution and average-pooled (`PIXEL_SCALE_FACTORS`), and the encoder's own feature
             maps at chosen stages (`models/feature_taps.py` says which, by a fixed rule); per
             depth the mean squared difference, its fourth root standardised by the median and MAD
             of the same figure on clean auxiliary images; the max over all depths (the default
             rule, `max_all`) or the mean over the stages alone (the earlier rule, `mean_stages`).
"""

from __future__ import annotations

import torch
from torch import nn

from models.conv_decoder import ConvDecoder
from models.decoder import TOKEN_GRID, DeDeDecoder, patchify, unpatchify
from models.feature_taps import TappedEncoder

PIXEL_SCORES = ("sse", "max_patch")
SCORE_KINDS = (*PIXEL_SCORES, "feature")
# The pixel depths of the feature score: full resolution and average-pooled by these factors of
# the side (32, 16, 8, 4 px grids at CIFAR's size). The conv decoder rebuilds layout and colour, not
# fine detail; a triggered image's rebuild shows the target's layout, which the coarse grids see
# without the detail no rebuild has.
PIXEL_SCALE_FACTORS = (1, 2, 4, 8)
COMBINES = ("max", "mean")
# How one depth's two maps (the input's, the rebuild's) are compared (`depth_discrepancies`);
# "both" keeps each depth twice, squared then relative.
DISCREPANCIES = ("squared", "relative", "both")


def compared(of_input: torch.Tensor, of_rebuild: torch.Tensor, discrepancy: str) -> torch.Tensor:
    """Two batch-first maps of one depth -> (N,): their mean squared difference ("squared"), or
    that over the sum of their mean squares ("relative"; 0 for two zero maps)."""
    a, b = of_input.float().flatten(1), of_rebuild.float().flatten(1)
    squared = (a - b).pow(2).mean(dim=1)
    if discrepancy == "squared":
        return squared
    if discrepancy != "relative":
        raise ValueError(f"depth discrepancy {discrepancy!r} is not one of {DISCREPANCIES}")
    energy = a.pow(2).mean(dim=1) + b.pow(2).mean(dim=1)
    return squared / torch.clamp(energy, min=torch.finfo(torch.float32).tiny)


def pixel_scale_discrepancies(
    x: torch.Tensor, rebuild: torch.Tensor, factors: tuple[int, ...], discrepancy: str = "squared"
) -> torch.Tensor:
    """Normalized images and their rebuilds -> (N, len(factors)): per factor, the two compared
    (`compared`) after k x k average pooling (k = 1: the pixels as they are)."""

    def pooled(t: torch.Tensor, k: int) -> torch.Tensor:
        return t if k == 1 else nn.functional.avg_pool2d(t, kernel_size=k, stride=k)

    x, rebuild = x.float(), rebuild.float()
    if discrepancy == "squared":  # pooling the difference: the same figure, as it was first exported
        diff = x - rebuild
        columns = [pooled(diff, k).pow(2).flatten(1).mean(dim=1) for k in factors]
    else:
        columns = [compared(pooled(x, k), pooled(rebuild, k), discrepancy) for k in factors]
    return torch.stack(columns, dim=1)


def depth_discrepancies(
    x: torch.Tensor,
    rebuild: torch.Tensor,
    of_input: list[torch.Tensor],
    of_rebuild: list[torch.Tensor],
    pixel_factors: tuple[int, ...] = (),
    discrepancy: str = "squared",
) -> torch.Tensor:
    """The feature score's depths -> (N, pixel factors + stages): the normalized images against
    their rebuilds at each pooling factor, then each stage's maps of the input against the
    rebuild's. The one definition the torch detector, the fit's statistics and the ONNX export use.
    "both": every depth squared, then every depth relative (twice the columns)."""
    if discrepancy == "both":
        return torch.cat(
            [
                depth_discrepancies(x, rebuild, of_input, of_rebuild, pixel_factors, kind)
                for kind in ("squared", "relative")
            ],
            dim=1,
        )
    d = torch.stack([compared(a, b, discrepancy) for a, b in zip(of_input, of_rebuild, strict=True)], dim=1)
    if pixel_factors:
        d = torch.cat([pixel_scale_discrepancies(x, rebuild, pixel_factors, discrepancy), d], dim=1)
    return d


class Normalize(nn.Module):
    """uint8 (N, 3, H, W) -> float normalized with the encoder's mean/std."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.mean.dtype) / 255.0 - self.mean) / self.std


def error_patch_size(decoder: nn.Module) -> int:
    """The cell of the per-patch error map: the MAE's patch, or an 8 x 8 grid for the conv decoder."""
    if isinstance(decoder, DeDeDecoder):
        return decoder.config.patch_size
    return max(1, decoder.config.image_size // TOKEN_GRID)


class DetectorHead(nn.Module):
    """(uint8 images, embeddings) -> (pixel score, reconstruction). Used alone when the encoder is an
    ONNX black box: the export then composes the encoder's graph in front of this one."""

    def __init__(
        self,
        decoder: DeDeDecoder | ConvDecoder,
        visible: list[int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        score_kind: str = "sse",
    ) -> None:
        super().__init__()
        if score_kind not in PIXEL_SCORES:
            raise ValueError(f"pixel score kind {score_kind!r} is not one of {PIXEL_SCORES}")
        if isinstance(decoder, ConvDecoder) and visible:
            raise ValueError("the conv decoder sees no patch of the input: visible must be empty")
        self.normalize = Normalize(mean, std)
        self.decoder = decoder
        self.score_kind = score_kind
        self.patch_size = error_patch_size(decoder)
        self.register_buffer("visible", torch.tensor(visible, dtype=torch.long).view(1, -1))

    def rebuild(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Normalized images and their embeddings -> the rebuild (N, 3, H, W), normalized."""
        if isinstance(self.decoder, ConvDecoder):
            return self.decoder(embedding)
        visible = self.visible.expand(x.shape[0], -1)
        pred = self.decoder(x, embedding.to(x.dtype), visible)
        p = self.decoder.config.patch_size
        return unpatchify(pred, p, x.shape[2], x.shape[3])

    def patch_errors(self, x: torch.Tensor, rebuild: torch.Tensor) -> torch.Tensor:
        """Squared error per image and patch (N, L), zeroed on the visible patches."""
        error = patchify((rebuild - x).pow(2), self.patch_size).sum(dim=-1)
        if self.visible.shape[1] > 0:
            error = error.scatter(1, self.visible.expand(x.shape[0], -1), 0.0)
        return error

    def forward(self, images: torch.Tensor, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(images)
        rebuild = self.rebuild(x, embedding)
        error = self.patch_errors(x, rebuild)
        score = error.sum(dim=1) if self.score_kind == "sse" else error.amax(dim=1)
        return score, rebuild


class Detector(nn.Module):
    """uint8 images (N, 3, H, W) -> (pixel score (N,), reconstruction (N, 3, H, W) normalized)."""

    def __init__(self, encoder: nn.Module, head: DetectorHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.encoder(self.head.normalize(images))
        return self.head(images, embedding)


class FeatureStandardiser(nn.Module):
    """Per-depth discrepancies (N, S) -> the feature score (N,): the max (or mean) over depths of
    (d ** 0.25 - centre) / scale, with centre and scale fixed on clean auxiliary images.

    The fourth root tames the discrepancies' long right tail as a logarithm would, but it is two
    correctly rounded square roots: ONNX Runtime's vectorised logarithm rounds differently for a
    batch of one image than for more, which would break "same bytes, same score, any batch"."""

    def __init__(self, centre: list[float], scale: list[float], combine: str = "mean") -> None:
        super().__init__()
        if not len(centre) == len(scale) > 0:
            raise ValueError("feature statistics need one centre and one scale per depth")
        if combine not in COMBINES:
            raise ValueError(f"feature statistics combine by one of {COMBINES}, not {combine!r}")
        self.combine = combine
        self.register_buffer("centre", torch.tensor(centre, dtype=torch.float32).view(1, -1))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, -1))

    def standardised(self, discrepancies: torch.Tensor) -> torch.Tensor:
        return (torch.sqrt(torch.sqrt(discrepancies)) - self.centre) / self.scale

    def forward(self, discrepancies: torch.Tensor) -> torch.Tensor:
        z = self.standardised(discrepancies)
        return z.amax(dim=1) if self.combine == "max" else z.mean(dim=1)


class FeatureDetector(nn.Module):
    """uint8 images -> (feature score (N,), reconstruction (N, 3, H, W) normalized).

    The encoder runs twice: on the input (its embedding and stage maps) and on the rebuild (its
    stage maps); the rebuild is already in the encoder's normalized input space."""

    def __init__(
        self,
        tapped: TappedEncoder,
        head: DetectorHead,
        standardiser: FeatureStandardiser,
        pixel_factors: tuple[int, ...] = (),
        discrepancy: str = "squared",
    ) -> None:
        super().__init__()
        if discrepancy not in DISCREPANCIES:
            raise ValueError(f"depth discrepancy {discrepancy!r} is not one of {DISCREPANCIES}")
        self.tapped = tapped
        self.head = head
        self.standardiser = standardiser
        self.pixel_factors = tuple(pixel_factors)
        self.discrepancy = discrepancy

    def depth_discrepancies(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images -> (per-depth discrepancies (N, pixel factors + stages), rebuild)."""
        x = self.head.normalize(images)
        embedding, of_input = self.tapped(x)
        rebuild = self.head.rebuild(x, embedding)
        _, of_rebuild = self.tapped(rebuild)
        d = depth_discrepancies(x, rebuild, of_input, of_rebuild, self.pixel_factors, self.discrepancy)
        return d, rebuild

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, rebuild = self.depth_discrepancies(images)
        return self.standardiser(d), rebuild
