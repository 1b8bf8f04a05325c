"""Thumbnails as one sprite image: the grid of 28 x 28 digits, encoded as a small PNG."""
from __future__ import annotations

import io
import math

import numpy as np

THUMB_SIDE = 28  # MNIST-family images are 28 x 28 pixels


# The sprite holds 16 grey levels (4 bits a pixel, a palette PNG): at thumbnail size they look
# like the 256 of the files, and the 10,000 test digits take 0.96 MB instead of 1.7 MB.
SPRITE_BITS = 4

SPRITE_MAX_SIDE = 8192  # TensorBoard's projector refuses larger sprites (and so may browsers' canvases)


def sprite(thumbnails: np.ndarray) -> np.ndarray:
    """One square image of all thumbnails (n, 28, 28) uint8: k x k cells, k = ceil(sqrt(n)),
    point i in row i // k, column i % k (TensorBoard's sprite layout); unused cells are black."""
    n, height, width = thumbnails.shape
    k = max(1, math.ceil(math.sqrt(n)))
    if k * max(height, width) > SPRITE_MAX_SIDE:
        raise ValueError(f"{n} thumbnails of {height}x{width} make a sprite over {SPRITE_MAX_SIDE} pixels wide")
    cells = np.zeros((k * k, height, width), dtype=np.uint8)
    cells[:n] = thumbnails
    # (k*k, h, w) -> (k, k, h, w) -> (k, h, k, w) -> (k*h, k*w)
    return cells.reshape(k, k, height, width).transpose(0, 2, 1, 3).reshape(k * height, k * width)


def png_bytes(image: np.ndarray, bits: int = SPRITE_BITS) -> bytes:
    """A grey (h, w) uint8 image as PNG with 2**bits grey levels (a palette image of that depth)."""
    from PIL import Image

    levels = 2**bits
    quantized = np.rint(image.astype(np.float32) * ((levels - 1) / 255.0)).astype(np.uint8)  # (h, w) in [0, levels)
    picture = Image.frombytes("P", (image.shape[1], image.shape[0]), quantized.tobytes())
    grey = np.rint(np.arange(levels) * (255.0 / (levels - 1))).astype(np.uint8)
    picture.putpalette(np.repeat(grey, 3).tolist())  # (levels * 3,) RGB triplets
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", bits=bits)
    return buffer.getvalue()


def sprite_png(thumbnails: np.ndarray) -> bytes:
    """The sprite of thumbnails (n, 28, 28) uint8 as PNG bytes (used by the HTML views and TensorBoard)."""
    return png_bytes(sprite(thumbnails))
