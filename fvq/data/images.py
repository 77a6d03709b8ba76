"""Image decoding, conversion to 8-bit RGB, and the bad-file policy shared by every file-backed dataset.

Every image that enters fvq goes through :func:`decode_image`: it fully decodes the file with PIL (so a truncated
file fails here, not later in a batch), converts any mode to 8-bit RGB with a documented rule per mode, and says
whether a conversion happened. Files that cannot be decoded raise :class:`BadImageError`.

Datasets hold one :class:`BadFilePolicy`. It counts files read, files skipped as bad and files converted, logs each
bad file with its path, and stops training with :class:`TooManyBadFilesError` once more than ``max_bad_fraction``
of the files read are bad. The counters live in shared memory with one row per DataLoader worker, so the numbers
read in the main process include the work of every worker (and :meth:`BadFilePolicy.reduce` adds up all ranks).

Mode rules (``decode_image``):

- ``RGB``: unchanged.
- ``L``, ``1``, ``YCbCr``, ``HSV``, ``LAB``, ``RGBX``: PIL's standard conversion to RGB.
- ``I;16`` / ``I;16B`` / ``I;16L`` / ``I`` (16-bit grayscale PNG): scaled by 255 / 65535 and rounded. PIL's own
  ``convert("L")`` clips every value above 255 to white instead.
- ``F`` (32-bit float): values read as [0, 1] when the maximum is at most 1, otherwise as [0, 255]; clipped.
- 16-bit RGB(A) PNG: PIL decodes these to 8 bits by keeping the high byte (``v >> 8``), a proper rescaling.
- ``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La`` and palette images with transparency: composited over a white
  background (``alpha="white"``, the default), or the alpha channel is dropped (``alpha="drop"``), which exposes
  whatever colour the transparent pixels happen to store (often black).
- ``CMYK`` (e.g. print JPEGs): converted through the embedded ICC profile to sRGB when the file carries one and
  PIL has LittleCMS; otherwise PIL's plain CMYK -> RGB formula.

EXIF orientation is not applied (like torchvision's ``ImageFolder`` and the reference ImageNet pipelines), so
evaluation crops match published protocols.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError

from fvq.distributed import is_distributed

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadFilePolicy",
    "BadFileStats",
    "BadImageError",
    "DecodedImage",
    "ImageSample",
    "SharedEpoch",
    "TooManyBadFilesError",
    "batch_images",
    "decode_image",
    "has_image_extension",
    "to_rgb",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")
"""File extensions read as images (compared case-insensitively)."""

AlphaPolicy = Literal["white", "drop"]
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_GRAY = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class BadImageError(ValueError):
    """A file could not be decoded as an image (unreadable, truncated, empty, or not an image)."""


class TooManyBadFilesError(ValueError):
    """More than the allowed fraction of the files read were bad; training must not go on silently."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image.

    Attributes:
        image: The picture as an 8-bit PIL image in mode ``RGB``.
        source_mode: The PIL mode of the file before conversion (``"RGB"``, ``"I;16"``, ``"CMYK"``, ...).
        converted: True when the file was not already 8-bit RGB and a conversion rule was applied.
    """

    image: Image.Image
    source_mode: str
    converted: bool


def _sixteen_bit_gray_to_l(image: Image.Image) -> Image.Image:
    """Rescale a 16-bit grayscale image to 8 bits: round(v * 255 / 65535), instead of PIL's clip at 255."""
    values = np.asarray(image, dtype=np.float64)
    scaled = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _float_to_l(image: Image.Image) -> Image.Image:
    """Float images: read as [0, 1] when max <= 1, otherwise as [0, 255]."""
    values = np.asarray(image, dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """CMYK -> sRGB through the embedded ICC profile when there is one, else PIL's formula."""
    icc = image.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            target = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(image, source, target, outputMode="RGB")
            if converted is not None:
                return converted
        except Exception as error:  # broken profile or no LittleCMS: fall back to the plain formula
            logger.debug("ICC conversion failed (%s); using PIL's CMYK -> RGB formula", error)
    return image.convert("RGB")


def to_rgb(image: Image.Image, *, alpha: AlphaPolicy = "white") -> tuple[Image.Image, bool]:
    """Convert a decoded PIL image of any mode to 8-bit RGB (rules in the module docstring).

    Args:
        image: A loaded PIL image.
        alpha: ``"white"`` composites transparent pixels over white; ``"drop"`` discards the alpha channel.

    Returns:
        The RGB image and whether a conversion was applied.
    """
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    mode = image.mode
    if mode == "RGB":
        return image, False
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image, True
    if mode in _SIXTEEN_BIT_GRAY:
        return _sixteen_bit_gray_to_l(image).convert("RGB"), True
    if mode == "F":
        return _float_to_l(image).convert("RGB"), True
    if mode == "CMYK":
        return _cmyk_to_rgb(image), True
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        if alpha == "drop":
            return rgba.convert("RGB"), True
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB"), True
    return image.convert("RGB"), True


def decode_image(
    source: str | os.PathLike | bytes | BinaryIO, *, name: str | None = None, alpha: AlphaPolicy = "white"
) -> DecodedImage:
    """Fully decode an image file (or its bytes) and convert it to 8-bit RGB.

    Args:
        source: A path, the raw file bytes, or a binary file object.
        name: How to name the file in error messages (defaults to the path when ``source`` is one).
        alpha: Transparency rule, see :func:`to_rgb`.

    Returns:
        A :class:`DecodedImage` whose ``image`` is an RGB PIL image of shape (H, W, 3) when viewed as an array.

    Raises:
        BadImageError: The file is empty, truncated, not an image, or PIL cannot decode it.
    """
    if name is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<bytes>"
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise BadImageError(f"{name}: empty file (0 bytes)")
            handle: BinaryIO = io.BytesIO(source)
        elif isinstance(source, (str, os.PathLike)):
            if os.path.getsize(source) == 0:
                raise BadImageError(f"{name}: empty file (0 bytes)")
            handle = open(source, "rb")
        else:
            handle = source
        try:
            with Image.open(handle) as opened:
                opened.load()  # full decode: truncated data fails here
                source_mode = opened.mode
                rgb, converted = to_rgb(opened, alpha=alpha)
                if rgb is opened:
                    rgb = opened.copy()
        finally:
            if isinstance(source, (str, os.PathLike)):
                handle.close()
    except BadImageError:
        raise
    except UnidentifiedImageError as error:
        raise BadImageError(f"{name}: not a recognised image file ({error})") from error
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as error:
        raise BadImageError(f"{name}: cannot decode ({type(error).__name__}: {error})") from error
    return DecodedImage(image=rgb, source_mode=source_mode, converted=converted)


@dataclass(frozen=True)
class BadFileStats:
    """Counts kept by a :class:`BadFilePolicy`.

    Attributes:
        seen: Files read (good and bad).
        bad: Files skipped because they could not be decoded.
        converted: Good files that needed a mode conversion (grayscale, 16-bit, CMYK, alpha, ...).
    """

    seen: int
    bad: int
    converted: int

    @property
    def bad_fraction(self) -> float:
        """Fraction of the files read that were bad (0 when nothing was read)."""
        return self.bad / self.seen if self.seen else 0.0


class BadFilePolicy:
    """One bad-file rule for every dataset: count, log, replace, and stop when too many are bad.

    Counters are a shared-memory int64 tensor of shape (max_workers + 1, 3) holding (seen, bad, converted): row 0
    for the main process, row ``w + 1`` for DataLoader worker ``w``. Each process writes only its own row, so no
    lock is needed, and the sums are visible from the main process and every worker, with fork or spawn.

    Args:
        max_bad_fraction: Stop (raise :class:`TooManyBadFilesError`) once more than this fraction of the files read
            are bad. 0 stops at the first bad file; 1 never stops.
        min_seen: The fraction is checked only after this many files were read, so that one bad file among the
            first few does not stop a large run. Datasets of known size set it to ``min(min_seen, len)``.
        max_logged: Bad files logged individually (with path and reason) per process; later ones are only counted.
        max_workers: Largest number of DataLoader workers supported.
    """

    def __init__(
        self, *, max_bad_fraction: float = 0.01, min_seen: int = 100, max_logged: int = 20, max_workers: int = 256
    ) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if min_seen < 1:
            raise ValueError(f"min_seen must be >= 1, got {min_seen}")
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_seen = int(min_seen)
        self.max_logged = int(max_logged)
        self.max_workers = int(max_workers)
        self._counts = torch.zeros(max_workers + 1, 3, dtype=torch.int64).share_memory_()
        self._logged = 0
        self.description = "dataset"

    def _row(self) -> int:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return 0
        if info.id >= self.max_workers:
            raise ValueError(f"BadFilePolicy supports at most {self.max_workers} workers, got worker id {info.id}")
        return info.id + 1

    @property
    def stats(self) -> BadFileStats:
        """Counts summed over the main process and all DataLoader workers of this rank."""
        seen, bad, converted = self._counts.sum(dim=0).tolist()
        return BadFileStats(seen=int(seen), bad=int(bad), converted=int(converted))

    @property
    def num_seen(self) -> int:
        return self.stats.seen

    @property
    def num_bad(self) -> int:
        return self.stats.bad

    @property
    def num_converted(self) -> int:
        return self.stats.converted

    def reset(self) -> None:
        """Zero all counters."""
        self._counts.zero_()

    def record_ok(self, *, converted: bool) -> None:
        """Count one good file (``converted`` when a mode conversion was applied), then check the bad fraction."""
        row = self._row()
        self._counts[row, 0] += 1
        if converted:
            self._counts[row, 2] += 1
        self.check()

    def record_bad(self, where: str, error: BaseException | str) -> None:
        """Count and log one bad file, then raise if the bad fraction is now above the limit.

        Args:
            where: Path of the file (or ``shard.tar:key``).
            error: Why it was skipped.
        """
        row = self._row()
        self._counts[row, 0] += 1
        self._counts[row, 1] += 1
        if self._logged < self.max_logged:
            self._logged += 1
            message = str(error)
            logger.warning("skipping bad image file: %s", message if where in message else f"{where}: {message}")
            if self._logged == self.max_logged:
                logger.warning("further bad files in %s are counted but not logged", self.description)
        self.check()

    def check(self) -> None:
        """Raise :class:`TooManyBadFilesError` when more than ``max_bad_fraction`` of the files read are bad."""
        stats = self.stats
        if stats.bad == 0 or stats.seen < self.min_seen:
            return
        if stats.bad > self.max_bad_fraction * stats.seen:
            raise TooManyBadFilesError(
                f"{stats.bad} of {stats.seen} image files read from {self.description} were unreadable "
                f"({100 * stats.bad_fraction:.2f} %), above max_bad_fraction={self.max_bad_fraction} "
                f"({100 * self.max_bad_fraction:.2f} %). The warnings above name the files; remove or repair them, "
                "or raise max_bad_fraction in the data config."
            )

    def reduce(self) -> BadFileStats:
        """Counts summed over all ranks (all-reduce when torch.distributed is initialised, else local)."""
        totals = self._counts.sum(dim=0)
        if is_distributed():
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            totals = totals.to(device)
            dist.all_reduce(totals)
        seen, bad, converted = totals.cpu().tolist()
        return BadFileStats(seen=int(seen), bad=int(bad), converted=int(converted))


def has_image_extension(path: str | Path) -> bool:
    """True when the file name ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


class ImageSample(NamedTuple):
    """One dataset item; batches collate to the same type with a leading batch axis.

    Attributes:
        image: float32 tensor of shape (3, H, W) in [-1, 1] (batched: (B, 3, H, W)).
        label: int64 scalar tensor: class index, or -1 when the dataset has no labels (batched: (B,)).
    """

    image: torch.Tensor
    label: torch.Tensor


def batch_images(batch: Any) -> torch.Tensor:
    """The ``(B, 3, H, W)`` images of a collated batch: a tensor, an :class:`ImageSample` or other (image, label)
    sequence, or a mapping with an ``image`` key."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        return batch["image"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}")


def make_sample(image: torch.Tensor, label: int) -> ImageSample:
    """Build an :class:`ImageSample` from a (3, H, W) tensor and an integer label (-1 for none)."""
    return ImageSample(image=image, label=torch.tensor(int(label), dtype=torch.int64))


class SharedEpoch:
    """The current epoch in shared memory, so DataLoader workers (persistent ones too) see ``set_epoch`` calls."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = torch.tensor([int(epoch)], dtype=torch.int64).share_memory_()

    @property
    def value(self) -> int:
        return int(self._value[0])

    def set(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self._value[0] = int(epoch)
