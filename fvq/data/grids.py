"""Image grids people look at (originals next to reconstructions, samples by class), written as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fvq.data.transforms import to_uint8_half_even


def image_grid(images: Tensor, nrow: int = 8, padding: int = 2, scale: int = 1) -> Image.Image:
    """Tile ``(B, 3, H, W)`` images in [-1, 1] into one PIL image, ``nrow`` per row, optionally upscaled (nearest)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
    arr = to_uint8_half_even(images).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    b, h, w, _ = arr.shape
    ncol = min(nrow, b)
    nrows = (b + ncol - 1) // ncol
    canvas = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        canvas[y : y + h, x : x + w] = arr[i]
    img = Image.fromarray(canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_reconstruction_grid(originals: Tensor, reconstructions: Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Save rows of originals, each followed by the row of their reconstructions, as a PNG."""
    if originals.shape != reconstructions.shape:
        raise ValueError(
            f"originals {tuple(originals.shape)} and reconstructions {tuple(reconstructions.shape)} differ in shape"
        )
    rows = []
    for i in range(0, originals.shape[0], nrow):
        rows += [originals[i : i + nrow], reconstructions[i : i + nrow]]
    pad = nrow - rows[-1].shape[0]
    if pad:
        filler = torch.ones(pad, *originals.shape[1:], dtype=originals.dtype, device=originals.device)
        rows[-2] = torch.cat([rows[-2], filler])
        rows[-1] = torch.cat([rows[-1], filler])
    scale = max(1, 128 // originals.shape[-1])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(torch.cat(rows), nrow=nrow, scale=scale).save(path)
    return path
