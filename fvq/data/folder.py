"""A dataset over a folder tree of JPEG / PNG / WebP files, optionally in ImageNet layout (one subfolder per class).

The file list is sorted and therefore the same on every machine and rank. Hidden files and folders (names starting
with ``.``, such as macOS ``._photo.jpg`` resource forks) are ignored. Bad files follow the shared
:class:`~fvq.data.images.BadFilePolicy`: each is logged and counted, the sample is replaced by the next readable file
(so batches stay full), and training stops once more than ``max_bad_fraction`` of the files read are bad. Each
index counts once per read (seen, and bad or converted); replacement reads are not counted again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from fvq.data.images import (
    IMAGE_EXTENSIONS,
    AlphaPolicy,
    BadFilePolicy,
    BadImageError,
    ImageSample,
    SharedEpoch,
    TooManyBadFilesError,
    decode_image,
    make_sample,
)
from fvq.data.transforms import sample_rng, to_tensor

__all__ = ["EmptyDatasetError", "ImageFolder", "ImageTransform", "scan_images"]

logger = logging.getLogger(__name__)

ImageTransform = Callable[[Image.Image, np.random.Generator], Image.Image]
"""A transform receives an RGB PIL image and the sample's generator and returns an RGB PIL image."""


class EmptyDatasetError(ValueError):
    """No image was found where the dataset was told to look."""


def _normalise_extensions(extensions: Sequence[str]) -> tuple[str, ...]:
    normalised = tuple(("." + e.lower().lstrip(".")) for e in extensions)
    if not normalised:
        raise ValueError("extensions must name at least one file extension, got an empty list")
    return normalised


def _walk_files(directory: str, extensions: tuple[str, ...]) -> list[str]:
    """Sorted paths of non-hidden files under ``directory`` (recursive, symlinks followed) with a listed extension."""
    found: list[str] = []
    for current, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if not filename.startswith(".") and os.path.splitext(filename)[1].lower() in extensions:
                found.append(os.path.join(current, filename))
    return sorted(found)


def scan_images(
    root: str | os.PathLike, *, labels: bool = False, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[str], list[int], list[str]]:
    """List the images under ``root``.

    Args:
        root: Folder to scan.
        labels: If True, ``root`` must hold one subfolder per class (ImageNet layout); the class index is the
            position of the subfolder name in sorted order. Files directly in ``root`` are then ignored (warned).
        extensions: File extensions to keep, compared case-insensitively.

    Returns:
        (paths, labels, classes): sorted file paths, one label per path (-1 everywhere when ``labels`` is False),
        and the sorted class names (empty when ``labels`` is False).

    Raises:
        FileNotFoundError: ``root`` is not a directory.
        EmptyDatasetError: No file with one of ``extensions`` was found.
    """
    root = os.fspath(root)
    extensions = _normalise_extensions(extensions)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
    if labels:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        loose = [e.name for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in extensions]
        if loose:
            logger.warning(
                "%d image files directly in %s are ignored: with labels=True images must sit in class subfolders",
                len(loose),
                root,
            )
        paths: list[str] = []
        targets: list[int] = []
        for index, name in enumerate(classes):
            files = _walk_files(os.path.join(root, name), extensions)
            paths.extend(files)
            targets.extend([index] * len(files))
    else:
        classes = []
        paths = _walk_files(root, extensions)
        targets = [-1] * len(paths)
    if not paths:
        layout = "class subfolders of " if labels else ""
        raise EmptyDatasetError(
            f"no images found in {layout}{os.path.abspath(root)!r} (searched recursively for extensions "
            f"{', '.join(extensions)}, case-insensitive; hidden files skipped)"
        )
    return paths, targets, classes


class ImageFolder(Dataset):
    """Images from a folder tree, decoded to RGB, transformed, and returned as :class:`ImageSample`.

    Args:
        root: Folder to scan recursively.
        transform: ``transform(image, rng) -> image`` applied to the RGB PIL image, e.g.
            :class:`~fvq.data.transforms.RandomResizedCropPaper` or :class:`~fvq.data.transforms.EvalCrop`.
            Every output must have the same size for batching.
        labels: Read class labels from subfolder names (ImageNet layout). Otherwise every label is -1.
        seed: Seed of the per-sample generator ``sample_rng(seed, epoch, index)``.
        extensions: File extensions to read (case-insensitive).
        max_bad_fraction: Stop with :class:`~fvq.data.images.TooManyBadFilesError` when more than this fraction
            of the files read are bad.
        alpha: Transparency rule (``"white"`` composite or ``"drop"``), see :func:`~fvq.data.images.to_rgb`.
        max_retries: Replacement files tried after a bad one before giving up on an index.

    Attributes:
        paths: Sorted file paths. labels: Class index per path (-1 without labels). classes: Class names.
        bad_files: The :class:`~fvq.data.images.BadFilePolicy` with the seen / bad / converted counters.

    Each item is ``ImageSample(image (3, S, S) float32 in [-1, 1], label int64 ())``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        transform: ImageTransform,
        labels: bool = False,
        seed: int = 0,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        max_bad_fraction: float = 0.01,
        alpha: AlphaPolicy = "white",
        max_retries: int = 16,
    ) -> None:
        if not callable(transform):
            raise TypeError(f"transform must be callable(image, rng) -> image, got {type(transform).__name__}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.root = Path(root)
        self.paths, self.labels, self.classes = scan_images(root, labels=labels, extensions=extensions)
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.transform = transform
        self.seed = int(seed)
        self.alpha: AlphaPolicy = alpha
        self.max_retries = int(max_retries)
        self.bad_files = BadFilePolicy(max_bad_fraction=max_bad_fraction, min_seen=min(100, len(self.paths)))
        self.bad_files.description = os.fspath(self.root)
        self._epoch = SharedEpoch()
        logger.info(
            "found %d images%s under %s",
            len(self.paths),
            f" in {len(self.classes)} classes" if labels else "",
            self.root,
        )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used to seed augmentation (seen by DataLoader workers, persistent ones included)."""
        self._epoch.set(epoch)

    def __getitem__(self, index: int) -> ImageSample:
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.paths)} images")
        rng = sample_rng(self.seed, self.epoch, index)
        # Only the file at ``index`` is counted (seen / bad / converted), so the counters describe the dataset's
        # files once per epoch; replacements are counted when their own index comes up.
        for attempt in range(self.max_retries + 1):
            candidate = (index + attempt) % len(self.paths)
            path = self.paths[candidate]
            try:
                decoded = decode_image(path, alpha=self.alpha)
            except BadImageError as error:
                if attempt == 0:
                    self.bad_files.record_bad(path, error)
                continue
            if attempt == 0:
                self.bad_files.record_ok(converted=decoded.converted)
            image = self.transform(decoded.image, rng)
            return make_sample(to_tensor(image), self.labels[candidate])  # image: (3, S, S)
        raise TooManyBadFilesError(
            f"{self.max_retries + 1} consecutive files starting at {self.paths[index]} could not be decoded "
            f"(see the warnings above); check the folder {self.root}"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={os.fspath(self.root)!r}, images={len(self)}, classes={len(self.classes)}, "
            f"transform={self.transform!r})"
        )
