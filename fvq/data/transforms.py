"""Training augmentation and evaluation crops (PIL + NumPy, no torchvision).

Randomness is always passed in as a ``numpy.random.Generator``; datasets build it with :func:`sample_rng` from
``(seed, epoch, index)``, so the crop and flip of a sample are a pure function of those numbers, whatever the number
of DataLoader workers or ranks, and a resumed run sees exactly the same pixels.

Resampling is explicit everywhere: PIL ``BICUBIC`` with ``reducing_gap=None`` (PIL then filters with a kernel
widened by the scale factor, i.e. it antialiases when shrinking). The LlamaGen/ADM protocols first halve large images
with a ``BOX`` filter while the short side is at least twice the target (:func:`adm_box_reduce`); we do the same in
the paper's training crop and in :func:`center_crop_llamagen` so that results match those pipelines.

- :class:`RandomResizedCropPaper`: short side resized to an integer drawn uniformly from
  [ceil(size * lo), ceil(size * hi)] (default [size, 1.25 size], 256 -> [256, 320] as in the FVQ/LlamaGen recipe),
  random ``size`` x ``size`` crop, horizontal flip with probability 0.5.
- :func:`center_crop_llamagen`: short side resized to ``size``, centre crop (LlamaGen/ADM evaluation).
- :func:`center_crop_fvq`: centre crop of the raw image without resizing (FVQ evaluation). An image whose short side
  is smaller than ``size`` is, by default, resized up (bicubic) so its short side equals ``size`` before cropping
  (``small="resize"``); ``small="pad"`` instead pads with black around the centred image, which is what
  torchvision's ``CenterCrop`` does.
- :func:`to_tensor`: 8-bit RGB -> float32 (3, H, W) in [-1, 1] (``v / 127.5 - 1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

__all__ = [
    "EVAL_CROPS",
    "CropParams",
    "EvalCrop",
    "RandomResizedCropPaper",
    "adm_box_reduce",
    "center_crop_fvq",
    "center_crop_llamagen",
    "resize_short_side",
    "sample_rng",
    "to_pil",
    "to_tensor",
    "to_uint8_half_even",
]

EvalProtocol = Literal["llamagen", "fvq"]
SmallImagePolicy = Literal["resize", "pad"]

EVAL_CROPS: dict[str, str] = {
    "llamagen": "LlamaGen/ADM crop: short side resized to S (BOX halving, then bicubic), centre crop S x S",
    "fvq": "FVQ crop: centre crop S x S of the raw image, no resizing (smaller images are first resized up to S)",
}
"""The evaluation crops by name (the ``protocol`` of :class:`EvalCrop`), each with what it does (``S`` = image size)."""


def sample_rng(*keys: int) -> np.random.Generator:
    """A generator that depends only on the given non-negative integers, e.g. ``sample_rng(seed, epoch, index)``.

    Args:
        keys: Non-negative integers (seed, epoch, index, ...); the same keys always give the same stream.
    """
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"sample_rng keys must be non-negative integers, got {keys}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in keys])))


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return int(size)


def _check_rgb(image: Image.Image) -> None:
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image (decode with fvq.data.images.decode_image), got mode {image.mode!r}")


def _short_side_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """PIL size (width, height) after resizing the shorter side to ``short_side``."""
    if width <= height:
        return short_side, max(short_side, round(height * short_side / width))
    return max(short_side, round(width * short_side / height)), short_side


def _box_reduced_size(width: int, height: int, target_short_side: int) -> tuple[int, int]:
    while min(width, height) >= 2 * target_short_side:
        width, height = width // 2, height // 2
    return width, height


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
    """Resize so that the shorter side equals ``short_side``, keeping the aspect ratio (bicubic, reducing_gap=None).

    The longer side becomes ``round(long * short_side / short)``.
    """
    short_side = _check_size(short_side)
    new_size = _short_side_size(*image.size, short_side)
    if new_size == image.size:
        return image
    return image.resize(new_size, resample=Image.Resampling.BICUBIC, reducing_gap=None)


def adm_box_reduce(image: Image.Image, target_short_side: int) -> Image.Image:
    """Halve the image with a BOX filter while its short side is >= 2 * ``target_short_side`` (ADM/LlamaGen step)."""
    while min(image.size) >= 2 * target_short_side:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX, reducing_gap=None)
    return image


@dataclass(frozen=True)
class CropParams:
    """The random choices of one training crop.

    Attributes:
        short_side: Short side, in pixels, the image is resized to before cropping.
        top: Row of the crop's top-left corner in the resized image.
        left: Column of the crop's top-left corner in the resized image.
        flip: Whether the crop is mirrored horizontally.
    """

    short_side: int
    top: int
    left: int
    flip: bool


class RandomResizedCropPaper:
    """FVQ/LlamaGen training augmentation: short side to U{size*lo .. size*hi}, random crop, horizontal flip.

    Call it as ``crop(image, rng)``, or split the draw from the pixels with ``apply(image, sample_params(...))``.

    Args:
        size: Output crop size in pixels (square).
        scale_range: (lo, hi) with 1 <= lo <= hi; the short side is drawn uniformly among the integers
            [ceil(size * lo), ceil(size * hi)]. Default (1.0, 1.25): 256 -> [256, 320].
        flip_prob: Probability of a horizontal flip.
        base_size: Base short side s, when it should differ from ``size``: the short side is then drawn from
            [ceil(s * lo), ceil(s * hi)] and the crop of ``size`` covers a smaller part of the picture (used by the
            embedded dataset to take small crops of large photos). Must be >= ``size``.
    """

    def __init__(
        self,
        size: int,
        scale_range: Sequence[float] = (1.0, 1.25),
        flip_prob: float = 0.5,
        *,
        base_size: int | None = None,
    ) -> None:
        self.size = _check_size(size)
        self.base_size = self.size if base_size is None else _check_size(base_size)
        if self.base_size < self.size:
            raise ValueError(f"base_size must be >= size ({self.size}), got {self.base_size}")
        if len(scale_range) != 2 or not 1.0 <= scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (lo, hi) with 1 <= lo <= hi, got {tuple(scale_range)}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip_prob = float(flip_prob)

    def sample_params(self, image_size: tuple[int, int], rng: np.random.Generator) -> CropParams:
        """Draw the crop for an image of PIL size (width, height)."""
        width, height = image_size
        low = math.ceil(self.base_size * self.scale_range[0])
        high = math.ceil(self.base_size * self.scale_range[1])
        short_side = int(rng.integers(low, high + 1))
        new_w, new_h = _short_side_size(*_box_reduced_size(width, height, short_side), short_side)
        top = int(rng.integers(0, new_h - self.size + 1))
        left = int(rng.integers(0, new_w - self.size + 1))
        flip = bool(rng.random() < self.flip_prob)
        return CropParams(short_side=short_side, top=top, left=left, flip=flip)

    def apply(self, image: Image.Image, params: CropParams) -> Image.Image:
        """Apply drawn crop parameters: BOX halving, bicubic resize, crop, optional flip."""
        return self.crop_resized(self.resize(image, params.short_side), params)

    @staticmethod
    def resize(image: Image.Image, short_side: int) -> Image.Image:
        """The resizing step of :meth:`apply` alone (BOX halving, then bicubic to ``short_side``)."""
        _check_rgb(image)
        return resize_short_side(adm_box_reduce(image, short_side), short_side)

    def crop_resized(self, resized: Image.Image, params: CropParams) -> Image.Image:
        """The crop and flip steps of :meth:`apply`, on an image already resized to ``params.short_side``."""
        crop = resized.crop((params.left, params.top, params.left + self.size, params.top + self.size))
        return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if params.flip else crop

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Return a random ``size`` x ``size`` RGB crop of ``image``."""
        return self.apply(image, self.sample_params(image.size, rng))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, scale_range={self.scale_range}, flip_prob={self.flip_prob}, "
            f"base_size={self.base_size})"
        )


def _center_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    top = (height - size) // 2
    left = (width - size) // 2
    return left, top, left + size, top + size


def center_crop_llamagen(image: Image.Image, size: int) -> Image.Image:
    """LlamaGen/ADM evaluation crop: BOX halving, short side bicubic-resized to ``size``, centre crop.

    Args:
        image: RGB PIL image.
        size: Output size (square).
    """
    size = _check_size(size)
    _check_rgb(image)
    resized = resize_short_side(adm_box_reduce(image, size), size)
    return resized.crop(_center_box(*resized.size, size))


def center_crop_fvq(image: Image.Image, size: int, *, small: SmallImagePolicy = "resize") -> Image.Image:
    """FVQ evaluation crop: centre ``size`` x ``size`` crop of the raw image, no resizing.

    Args:
        image: RGB PIL image.
        size: Output size (square).
        small: When the short side is below ``size``: ``"resize"`` scales the image up (bicubic) so the short side
            equals ``size``, then crops; ``"pad"`` pads the centred image with black (torchvision ``CenterCrop``).
    """
    size = _check_size(size)
    _check_rgb(image)
    if small not in ("resize", "pad"):
        raise ValueError(f"small must be 'resize' or 'pad', got {small!r}")
    width, height = image.size
    if min(width, height) < size:
        if small == "resize":
            image = resize_short_side(image, size)
        else:
            canvas = Image.new("RGB", (max(width, size), max(height, size)), (0, 0, 0))
            canvas.paste(image, ((canvas.width - width) // 2, (canvas.height - height) // 2))
            image = canvas
    return image.crop(_center_box(*image.size, size))


class EvalCrop:
    """Deterministic evaluation crop by protocol name (``"llamagen"`` or ``"fvq"``).

    Args:
        size: Output size (square).
        protocol: ``"llamagen"`` (:func:`center_crop_llamagen`) or ``"fvq"`` (:func:`center_crop_fvq`).
        small: Small-image rule for the ``"fvq"`` protocol.
    """

    def __init__(self, size: int, protocol: EvalProtocol = "llamagen", *, small: SmallImagePolicy = "resize") -> None:
        if protocol not in EVAL_CROPS:
            raise ValueError(f"protocol must be {' or '.join(map(repr, EVAL_CROPS))}, got {protocol!r}")
        self.size = _check_size(size)
        self.protocol = protocol
        self.small = small

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        """Crop ``image``; ``rng`` is accepted for a uniform transform signature and ignored."""
        if self.protocol == "llamagen":
            return center_crop_llamagen(image, self.size)
        return center_crop_fvq(image, self.size, small=self.small)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, protocol={self.protocol!r}, small={self.small!r})"


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 tensor of shape (3, H, W) in [-1, 1] (0 -> -1, 255 -> 1)."""
    _check_rgb(image)
    array = np.array(image, dtype=np.uint8, copy=True)  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)  # (3, H, W)


def to_uint8_half_even(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255]: ``127.5 (x + 1)`` in float32, rounded half to even
    (``torch.round``), clipped; the pixels :func:`to_pil`, the PNGs of ``fvq decode`` and the image grids hold.

    The evaluation metrics round otherwise (``floor(255 x + 0.5)`` on [0, 1] in float64, half up:
    :func:`fvq.evaluation.evaluate.to_uint8`); the two differ on values exactly halfway between two levels.

    Args:
        images: Float tensor of any shape, e.g. ``(3, H, W)`` or ``(B, 3, H, W)``.

    Returns:
        ``uint8`` tensor of the same shape, on the CPU.
    """
    return ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Inverse of :func:`to_tensor`: float tensor (3, H, W) in [-1, 1] -> 8-bit RGB PIL image
    (:func:`to_uint8_half_even`)."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a tensor of shape (3, H, W), got {tuple(tensor.shape)}")
    array = to_uint8_half_even(tensor)  # (3, H, W)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), mode="RGB")
