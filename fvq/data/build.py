"""Datasets and loaders from plain-dict configs, with epoch-aware, resumable, distributed sampling.

``build_dataset(config, split)`` turns the ``data`` section of an experiment config into a dataset::

    {"type": "embedded", "image_size": 32}                                   # default, no download
    {"type": "folder", "path": "/data/imagenet", "labels": True, "image_size": 256, "eval_crop": "fvq"}
    {"type": "shards", "path": "/data/shards/{split}-{000000..001023}.tar", "samples_per_epoch": 1281167}

``build_loader(dataset, batch_size, shuffle=..., seed=...)`` returns an :class:`ImageLoader`, a ``DataLoader`` with
``set_epoch(epoch, start_batch=0)``. For map-style datasets it samples with :class:`ResumableDistributedSampler`
(each rank takes every ``world_size``-th index of one permutation per epoch, seeded by ``(seed, epoch)``, and can
start at any position), so a run resumed at batch ``k`` of epoch ``e`` sees exactly the batches it would have seen,
with the same augmentation, whatever ``num_workers`` is: augmentation is a pure function of ``(seed, epoch, index)``.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from fvq.data.embedded import EmbeddedPhotos
from fvq.data.folder import ImageFolder, ImageTransform
from fvq.data.images import IMAGE_EXTENSIONS, BadFileStats
from fvq.data.shards import ShardDataset
from fvq.data.transforms import EvalCrop, RandomResizedCropPaper, sample_rng
from fvq.distributed import placement

__all__ = [
    "DATASET_TYPES",
    "ImageLoader",
    "ResumableDistributedSampler",
    "bad_file_stats",
    "build_dataset",
    "build_loader",
    "build_transform",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_COMMON_KEYS = {"type", "image_size", "seed"}
_FILE_KEYS = {"path", "train_path", "val_path", "test_path", "labels", "max_bad_fraction", "alpha", "scale_range"}
_FILE_KEYS |= {"eval_crop", "eval_small"}
DATASET_TYPES: dict[str, set[str]] = {
    "embedded": _COMMON_KEYS | {"base_size", "samples_per_epoch", "val_samples", "val_seed", "scale_range"},
    "folder": _COMMON_KEYS | _FILE_KEYS | {"extensions"},
    "shards": _COMMON_KEYS | _FILE_KEYS | {"shuffle_buffer", "samples_per_epoch"},
}
"""Dataset types and the config keys each accepts."""


def build_transform(
    split: str,
    image_size: int,
    *,
    scale_range: tuple[float, float] = (1.0, 1.25),
    eval_crop: str = "llamagen",
    eval_small: str = "resize",
) -> ImageTransform:
    """The paper's augmentation for ``"train"``, a deterministic centre crop (by protocol) for other splits.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: Output size (square).
        scale_range: Short-side range for the training crop, relative to ``image_size``.
        eval_crop: ``"llamagen"`` (resize short side, centre crop) or ``"fvq"`` (centre crop of the raw image).
        eval_small: What the ``"fvq"`` crop does with images smaller than ``image_size``: ``"resize"`` or ``"pad"``.
    """
    if split == "train":
        return RandomResizedCropPaper(image_size, scale_range)
    return EvalCrop(image_size, eval_crop, small=eval_small)  # type: ignore[arg-type]


def _get_int(config: Mapping[str, Any], key: str, default: int | None, minimum: int) -> int | None:
    value = config.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"data config {key!r} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _resolve_path(config: Mapping[str, Any], split: str, kind: str) -> str:
    """``{split}_path`` if given; else ``path`` with ``{split}`` substituted, or ``path/<split>`` when that folder
    exists (folders only)."""
    explicit = config.get(f"{split}_path")
    if explicit is not None:
        return os.fspath(explicit)
    if config.get("path") is None:
        raise ValueError(f"data config of type {kind!r} needs 'path' (or '{split}_path'), got keys {sorted(config)}")
    path = os.fspath(config["path"])
    if "{split}" in path:
        return path.replace("{split}", split)
    if kind == "folder":
        candidate = os.path.join(path, split)
        if os.path.isdir(candidate):
            return candidate
    return path


def warn_if_validation_reads_training(train_config: Mapping[str, Any], val_config: Mapping[str, Any]) -> bool:
    """Warn (and return True) when the validation split of ``val_config`` reads the very images that the training
    split of ``train_config`` reads, e.g. a folder without a ``val`` subfolder given once for both.

    A separate ``val_data`` folder is a different set even without a ``val`` subfolder: no warning then.
    """
    kinds = {train_config.get("type", "embedded"), val_config.get("type", "embedded")}
    if kinds & {"embedded"}:  # the embedded photos hold out their own validation photos
        return False
    try:
        train_path = _resolve_path(train_config, "train", train_config.get("type", "folder"))
        val_path = _resolve_path(val_config, "val", val_config.get("type", "folder"))
    except ValueError:
        return False
    if os.path.abspath(train_path) != os.path.abspath(val_path):
        return False
    logger.warning(
        "validation reads the same images as training (%s): give a held-out folder with 'val_data.path', a 'val' "
        "subfolder, or 'data.val_path'",
        val_path,
    )
    return True


def build_dataset(config: Mapping[str, Any], split: str) -> Dataset:
    """Build the dataset of one split from a plain dict.

    Args:
        config: ``{"type": "embedded" | "folder" | "shards", ...}``; the keys each type accepts are in
            :data:`DATASET_TYPES`. Common: ``image_size`` (default 32), ``seed`` (0). Folder and shards: ``path``
            (or ``train_path`` / ``val_path``; ``{split}`` in ``path`` is replaced by the split name; a folder
            ``path`` with a ``<split>`` subfolder uses it), ``labels`` (False), ``max_bad_fraction`` (0.01),
            ``alpha`` ("white"), ``scale_range`` ((1.0, 1.25)), ``eval_crop`` ("llamagen" | "fvq"), ``eval_small``
            ("resize" | "pad"). Folder: ``extensions``. Shards: ``shuffle_buffer`` (1000), ``samples_per_epoch``.
            Embedded: ``base_size``, ``samples_per_epoch`` (8192), ``val_samples`` (1024), ``val_seed``.
        split: ``"train"`` (random crops and flips) or ``"val"`` / ``"test"`` (deterministic crops).

    Returns:
        A dataset whose items are :class:`~fvq.data.images.ImageSample` with images (3, S, S) in [-1, 1].
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"data config must be a mapping, got {type(config).__name__}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind = config.get("type", "embedded")
    if kind not in DATASET_TYPES:
        raise ValueError(f"data config 'type' must be one of {sorted(DATASET_TYPES)}, got {kind!r}")
    unknown = sorted(set(config) - DATASET_TYPES[kind])
    if unknown:
        raise ValueError(f"unknown keys {unknown} for data type {kind!r}; allowed: {sorted(DATASET_TYPES[kind])}")
    image_size = _get_int(config, "image_size", 32, 1)
    seed = _get_int(config, "seed", 0, 0)
    scale_range = tuple(config.get("scale_range", (1.0, 1.25)))

    if kind == "embedded":
        return EmbeddedPhotos(
            "train" if split == "train" else "val",
            image_size=image_size,
            base_size=_get_int(config, "base_size", None, 1),
            samples_per_epoch=_get_int(config, "samples_per_epoch", 8192, 1),
            val_samples=_get_int(config, "val_samples", 1024, 1),
            seed=seed,
            val_seed=_get_int(config, "val_seed", 0, 0),
            scale_range=scale_range,
        )

    transform = build_transform(
        split,
        image_size,
        scale_range=scale_range,
        eval_crop=config.get("eval_crop", "llamagen"),
        eval_small=config.get("eval_small", "resize"),
    )
    common = {
        "transform": transform,
        "labels": bool(config.get("labels", False)),
        "seed": seed,
        "max_bad_fraction": float(config.get("max_bad_fraction", 0.01)),
        "alpha": config.get("alpha", "white"),
    }
    path = _resolve_path(config, split, kind)
    if kind == "folder":
        return ImageFolder(path, extensions=tuple(config.get("extensions", IMAGE_EXTENSIONS)), **common)
    return ShardDataset(
        path,
        shuffle=split == "train",
        shuffle_buffer=_get_int(config, "shuffle_buffer", 1000, 1),
        samples_per_epoch=_get_int(config, "samples_per_epoch", None, 1) if split == "train" else None,
        **common,
    )


class ResumableDistributedSampler(Sampler[int]):
    """Per-epoch permutation split across ranks, able to start mid-epoch.

    Epoch ``e`` uses one permutation of ``range(len(dataset))`` drawn from ``(seed, e)`` (or the identity when
    ``shuffle`` is False). Without ``drop_last`` the permutation is padded by repeating its start so every rank gets
    ``ceil(n / world_size)`` indices; with ``drop_last`` the tail is dropped so every rank gets ``n // world_size``.
    Rank ``r`` takes positions ``r, r + world_size, ...``, starting from ``start_index``.

    Args:
        dataset: A map-style dataset (anything with ``__len__``); its ``set_epoch`` is called by :meth:`set_epoch`.
        shuffle: Shuffle each epoch.
        seed: Permutation seed (the same on every rank).
        rank: This rank (default: torch.distributed's, else 0).
        world_size: Number of ranks (default: torch.distributed's, else 1).
        drop_last: Drop the tail instead of padding.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.dataset = dataset
        self.num_items = len(dataset)  # type: ignore[arg-type]
        self.rank, self.world_size = placement(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if drop_last and self.num_items < self.world_size:
            raise ValueError(f"drop_last with {self.num_items} items and {self.world_size} ranks leaves nothing")
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.start_index = 0
        if drop_last:
            self.num_samples = self.num_items // self.world_size
        else:
            self.num_samples = -(-self.num_items // self.world_size)

    def set_epoch(self, epoch: int, *, start_index: int = 0) -> None:
        """Select the epoch's permutation (and the dataset's augmentation epoch); start at ``start_index``.

        Args:
            epoch: Epoch number (>= 0).
            start_index: Position in this rank's share to start from, e.g. ``batches_done * batch_size``.
        """
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index must be in [0, {self.num_samples}], got {start_index}")
        self.epoch = int(epoch)
        self.start_index = int(start_index)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)

    def indices(self) -> list[int]:
        """This rank's whole share of the current epoch (ignoring ``start_index``)."""
        if self.shuffle:
            order = sample_rng(self.seed, self.epoch).permutation(self.num_items).tolist()
        else:
            order = list(range(self.num_items))
        total = self.num_samples * self.world_size
        if total <= len(order):
            order = order[:total]
        else:
            repeats = -(-total // len(order))
            order = (order * repeats)[:total]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start_index :])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's global generators from torch's per-worker seed (for user transforms)."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


class ImageLoader(DataLoader):
    """A ``DataLoader`` whose :meth:`set_epoch` reaches the sampler and the dataset, and can resume mid-epoch."""

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """Prepare epoch ``epoch``, skipping its first ``start_batch`` batches (to resume a run exactly).

        Call it before iterating over the loader each epoch.
        """
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        if isinstance(self.dataset, IterableDataset):
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch, skip_batches=start_batch, batch_size=self.batch_size or 1)
            return
        if isinstance(self.sampler, ResumableDistributedSampler):
            start_index = min(start_batch * (self.batch_size or 1), self.sampler.num_samples)
            self.sampler.set_epoch(epoch, start_index=start_index)
        elif hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    @property
    def bad_files(self) -> BadFileStats | None:
        """This rank's seen / bad / converted file counts over all workers (None for datasets without files)."""
        policy = getattr(self.dataset, "bad_files", None)
        return policy.stats if policy is not None else None


def bad_file_stats(dataset: Dataset) -> BadFileStats | None:
    """Seen / bad / converted counts of ``dataset`` summed over all workers and all ranks (collective call)."""
    policy = getattr(dataset, "bad_files", None)
    return policy.reduce() if policy is not None else None


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    prefetch_factor: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> ImageLoader:
    """Wrap a dataset in an :class:`ImageLoader` with resumable, distributed, deterministic sampling.

    Args:
        dataset: From :func:`build_dataset` (map-style or :class:`~fvq.data.shards.ShardDataset`).
        batch_size: Samples per batch on this rank.
        shuffle: Shuffle per epoch (map-style datasets; shard datasets shuffle themselves when built for training).
        seed: Seed of the permutation and of the DataLoader's worker seeds.
        num_workers: DataLoader worker processes.
        drop_last: Drop the last incomplete batch (and the dataset tail that does not split evenly over ranks),
            so every rank runs the same number of equal-size steps. Use False for evaluation.
        pin_memory: Pin batches for faster host-to-GPU copies.
        persistent_workers: Keep workers alive between epochs (``set_epoch`` still reaches them).
        prefetch_factor: Batches prefetched per worker (DataLoader default when None).
        rank: Rank override (default: torch.distributed's, else 0).
        world_size: World size override.

    Returns:
        An :class:`ImageLoader` yielding ``ImageSample(image (B, 3, S, S), label (B,))``. Call
        ``loader.set_epoch(epoch)`` (or ``loader.set_epoch(epoch, start_batch=k)`` when resuming) before each epoch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    rank, world_size = placement(rank, world_size)
    sampler = None
    if not isinstance(dataset, IterableDataset):
        sampler = ResumableDistributedSampler(
            dataset, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last
        )
    generator = torch.Generator()
    generator.manual_seed(int(sample_rng(seed, rank).integers(2**62)))
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    loader = ImageLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=_seed_worker,
        generator=generator,
        **extra,
    )
    loader.set_epoch(0)
    return loader
