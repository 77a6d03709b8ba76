"""Real image files, good and broken, written into tmp_path for the data tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def rgb_array(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random colour picture (H, W, 3) uint8 that survives JPEG without surprises."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR))


def png16(array: np.ndarray, color_type: int) -> bytes:
    """Encode a uint16 array as a 16-bit PNG by hand (PIL cannot write 16-bit RGB). color_type 0 gray, 2 RGB."""
    height, width = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def jpeg_bytes(array: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_good(path: Path, seed: int, size: tuple[int, int] = (40, 48)) -> Path:
    """A valid RGB image; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(rgb_array(size[0], size[1], seed))
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[path.suffix.lower()]
    image.save(path, format=fmt)
    return path


def write_broken(directory: Path) -> dict[str, Path]:
    """The four kinds of bad file: truncated JPEG, zero bytes, text named .png, random bytes named .webp."""
    directory.mkdir(parents=True, exist_ok=True)
    data = jpeg_bytes(rgb_array(64, 64, 99))
    files = {
        "truncated": directory / "truncated.jpg",
        "empty": directory / "empty.jpg",
        "text": directory / "notes.png",
        "garbage": directory / "noise.webp",
    }
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not an image\n")
    files["garbage"].write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return files


@pytest.fixture
def good_folder(tmp_path: Path) -> Path:
    """ImageNet layout: 3 classes x 3 images, mixed formats and extension cases."""
    root = tmp_path / "images"
    names = ["a.jpg", "b.PNG", "c.webp"]
    for c, cls in enumerate(["cat", "ant", "bee"]):
        for i, name in enumerate(names):
            write_good(root / cls / name, seed=10 * c + i)
    return root


@pytest.fixture
def imgs():
    """File helpers for tests (test modules cannot import conftest under --import-mode=importlib)."""
    import types

    return types.SimpleNamespace(
        rgb_array=rgb_array, png16=png16, jpeg_bytes=jpeg_bytes, write_good=write_good, write_broken=write_broken
    )
