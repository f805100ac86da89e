"""Image samples: flattened token sequences tiled into one PNG grid."""

import io
import math

import numpy as np
from PIL import Image


def image_grid(
    tokens: np.ndarray, shape: tuple[int, int, int], *, columns: int | None = None, padding: int = 2
) -> np.ndarray:
    """Tile sequences of pixel values into one uint8 image.

    Arguments:
        tokens: shape (N, H * W * C), each row an image flattened in (height, width,
            channels) order with values 0..255 (larger values, e.g. a mask state, are
            clipped to 255).
        shape: (H, W, C) with C = 1 (grey) or 3 (RGB).
        columns: images per row (default: ceil(sqrt(N))).
        padding: pixels of black between images.

    Returns:
        An array of shape (rows * (H + p) + p, columns * (W + p) + p, C), dtype uint8.
    """
    height, width, channels = shape
    count = tokens.shape[0]
    images = np.clip(tokens, 0, 255).astype(np.uint8).reshape(count, height, width, channels)
    columns = columns or max(1, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / columns)
    grid = np.zeros(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
        np.uint8,
    )
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 array of shape (H, W, 1) or (H, W, 3) as PNG."""
    pixels = image[..., 0] if image.shape[-1] == 1 else image
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
