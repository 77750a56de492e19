"""Imported once by the fork server that forks the decode workers (service/decode_workers.py), so that
a new worker starts with Pillow's plugins registered and its decoders loaded: a fresh worker's first
image then costs what any image costs, not the imports (~25 ms idle, far more on a busy machine)."""

from __future__ import annotations

import io

from PIL import Image

from models.bundle import InputSpec
from service.decoding import DecodeLimits, decode_image

Image.init()
for _format in ("PNG", "JPEG", "WEBP", "BMP"):
    _buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(_buffer, format=_format)
    decode_image(
        _buffer.getvalue(),
        InputSpec(height=4, width=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        DecodeLimits(64),
    )
