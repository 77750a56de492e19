"""How each lab encoder spreads the auxiliary images that `dede fit --data tinyimagenet_val` embeds.

    python -m benchmarks.detection.aux_spread \
        --encoder clean=runs/lab-hard/simclr_clean/encoder.safetensors \
        --encoder badencoder_warp=runs/lab-hard/encoders/badencoder_warp/encoder.safetensors ...

For each encoder: `training.fit.embedding_spread` of the 2,000 Tiny-ImageNet images resized to the
encoder's input (what `dede fit --data tinyimagenet_val` embeds) and of the same number of native
crops at the input size (no resampling), so that a backdoor which fires on resampled images shows
as a collapse of the first and not of the second. Writes benchmarks/detection/aux_spread.json with
the machine, commit and command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from benchmarks.provenance import REPO_ROOT, run_record
from models.bundle import prepare_array
from models.encoders import load_encoder
from training.data import data_dir, load_npz
from training.fit import embed_images, embedding_spread

N_IMAGES = 2000


def native_crops(images_nhwc: np.ndarray, size: int) -> np.ndarray:
    """One crop of `size` px per image, at the four corners in turn: no pixel is resampled."""
    h, w = images_nhwc.shape[1:3]
    if h < size or w < size:
        raise SystemExit(f"the auxiliary images are {h}x{w}, smaller than the encoder's {size} px input")
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    crops = []
    for index, image in enumerate(images_nhwc):
        y, x = corners[index % len(corners)]
        crops.append(image[y : y + size, x : x + size])
    return np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", action="append", required=True, help="NAME=PATH")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks" / "detection" / "aux_spread.json"
    )
    args = parser.parse_args()
    tiny, _ = load_npz(data_dir() / "tinyimagenet_val.npz")
    tiny = tiny[:N_IMAGES]
    results = json.loads(args.out.read_text()) if args.out.exists() else {"encoders": {}}
    for item in args.encoder:
        name, _, path = item.partition("=")
        encoder = load_encoder(path)
        spec = encoder.identity.input_spec()
        resized = prepare_array(tiny, spec)
        crops = native_crops(tiny, spec.height)
        device = torch.device("cpu")
        results["encoders"][name] = {
            "encoder": path,
            "resized": embedding_spread(embed_images(encoder, resized, device, progress=False)),
            "native_crops": embedding_spread(embed_images(encoder, crops, device, progress=False)),
            "run": run_record(),
        }
        print(
            name, results["encoders"][name]["resized"], results["encoders"][name]["native_crops"], flush=True
        )
    results.update(run_record())
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
