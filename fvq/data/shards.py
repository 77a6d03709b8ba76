"""WebDataset-style ``.tar`` shards, read with Python's ``tarfile`` (no ``webdataset`` dependency).

A shard is a plain tar file. Members that share a key (the member path up to the first dot of its file name) form
one sample: ``n01440764/000123.jpg`` + ``n01440764/000123.cls`` is the sample with key ``n01440764/000123`` and
extensions ``jpg`` and ``cls``. Members of a sample must be adjacent in the tar (as every shard writer does).

- Image member: the first of the extensions ``jpg``, ``jpeg``, ``png``, ``webp`` (case-insensitive).
- Label member (optional): ``cls`` (an integer as text), ``txt`` (used only when it holds an integer), or ``json``
  (an integer, or an object with an integer under ``"label"``, ``"cls"`` or ``"class"``).

:class:`ShardDataset` is an ``IterableDataset``. Each epoch, the shard list is shuffled with ``(seed, epoch)``
(identically on every rank) and split across ranks x DataLoader workers. With at least as many shards as
``world_size * num_workers`` each shard goes to exactly one reader; with fewer, every reader opens every shard and
keeps every ``world_size * num_workers``-th sample, so each sample is still read exactly once. A shuffle buffer mixes
samples within a reader; the augmentation of a sample depends only on ``(seed, epoch, shard, position in shard)``.

Set ``samples_per_epoch`` for multi-GPU training: each rank then yields exactly ``samples_per_epoch // world_size``
samples per epoch (cycling through its shards if needed), so every rank runs the same number of steps. Without it,
an epoch is one pass over the shards and ranks may get different numbers of samples.

Bad images, samples without an image or without a required label, and unreadable or truncated tar files go through
the same :class:`~fvq.data.images.BadFilePolicy` as folder datasets: counted, logged, skipped.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from zlib import error as ZlibError  # corrupt gzip-compressed shards raise zlib.error

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from fvq.data.folder import ImageTransform, scan_images
from fvq.data.images import (
    IMAGE_EXTENSIONS,
    AlphaPolicy,
    BadFilePolicy,
    BadImageError,
    ImageSample,
    SharedEpoch,
    decode_image,
    make_sample,
)
from fvq.data.transforms import sample_rng, to_tensor
from fvq.distributed import placement

__all__ = [
    "ShardDataset",
    "ShardWriter",
    "TarSample",
    "expand_urls",
    "iter_tar_samples",
    "split_key",
    "write_shards_from_folder",
]

logger = logging.getLogger(__name__)

SHARD_IMAGE_EXTENSIONS: tuple[str, ...] = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> 3 names (zero padding kept); ``{x,y}`` -> alternatives; nested and repeated braces."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = _RANGE.match(body)
    if numeric:
        start_text, end_text = numeric.groups()
        start, end = int(start_text), int(end_text)
        if end < start:
            raise ValueError(f"brace range {{{body}}} in {pattern!r} goes down; expected start <= end")
        width = len(start_text) if start_text.startswith("0") and len(start_text) > 1 else 0
        options = [str(i).zfill(width) for i in range(start, end + 1)]
    else:
        options = body.split(",")
    return [name for option in options for name in _expand_braces(head + option + tail)]


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand shard patterns into a list of existing ``.tar`` paths.

    Args:
        urls: A path, a pattern, or a list of them. Patterns may use brace ranges and lists
            (``data-{000000..000099}.tar``, ``{train,extra}-*.tar``), shell globs (``*``, ``?``, ``[...]``), and
            ``::`` to join several patterns in one string. A directory stands for all ``*.tar`` files in it.

    Returns:
        The paths in the order given (brace expansion order; globs sorted), duplicates removed.

    Raises:
        FileNotFoundError: A pattern matched nothing, or a named file does not exist.
    """
    if isinstance(urls, (str, os.PathLike)):
        patterns = os.fspath(urls).split("::")
    else:
        patterns = [os.fspath(u) for u in urls]
    if not patterns or not any(p.strip() for p in patterns):
        raise ValueError(f"expected at least one shard path or pattern, got {urls!r}")
    paths: list[str] = []
    for pattern in patterns:
        for name in _expand_braces(os.path.expanduser(pattern.strip())):
            if os.path.isdir(name):
                matches = sorted(glob.glob(os.path.join(glob.escape(name), "*.tar")))
            elif glob.has_magic(name):
                matches = sorted(glob.glob(name))
            else:
                matches = [name] if os.path.isfile(name) else []
            if not matches:
                raise FileNotFoundError(f"shard pattern {pattern!r} matched no file (no {name!r})")
            paths.extend(matches)
    return list(dict.fromkeys(paths))


def split_key(member_name: str) -> tuple[str, str]:
    """``"dir/abc.seg.png"`` -> (``"dir/abc"``, ``"seg.png"``): key up to the first dot of the file name, extension."""
    directory, base = os.path.split(member_name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), ext.lower()


@dataclass
class TarSample:
    """The members of one sample in a shard.

    Attributes:
        key: Sample key. shard: Path of the tar file. position: Index of the sample within its shard.
        files: Member contents by extension (``{"jpg": b"...", "cls": b"3"}``).
        repeat: Which pass over the shards produced it within an epoch (> 0 only with ``samples_per_epoch``).
    """

    key: str
    shard: str
    position: int
    files: dict[str, bytes]
    repeat: int = 0


class ShardReadError(OSError):
    """A tar file is unreadable or truncated."""


def iter_tar_samples(path: str) -> Iterator[TarSample]:
    """Stream the samples of one tar shard, grouping adjacent members that share a key.

    Raises:
        ShardReadError: The file is not a tar file or ends early (raised after the samples read so far).
    """
    position = 0
    current: TarSample | None = None
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if os.path.basename(key).startswith(".") or not ext:
                    continue
                handle = archive.extractfile(member)
                data = handle.read() if handle is not None else b""
                if current is not None and key != current.key:
                    yield current
                    position += 1
                    current = None
                if current is None:
                    current = TarSample(key=key, shard=path, position=position, files={})
                current.files[ext] = data
    except (tarfile.TarError, EOFError, OSError, ZlibError) as error:
        raise ShardReadError(f"{path}: unreadable or truncated tar after {position} samples ({error})") from error
    if current is not None:
        yield current


def _image_member(files: dict[str, bytes]) -> str | None:
    for ext in SHARD_IMAGE_EXTENSIONS:
        if ext in files:
            return ext
    for ext in files:  # e.g. "input.jpg"
        if ext.rsplit(".", 1)[-1] in SHARD_IMAGE_EXTENSIONS:
            return ext
    return None


def _parse_int(text: bytes) -> int | None:
    try:
        return int(text.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        return None


def _label_of(files: dict[str, bytes]) -> int | None:
    """Integer label from ``cls``, then ``txt``, then ``json``; None when there is none."""
    for ext in ("cls", "txt"):
        if ext in files:
            value = _parse_int(files[ext])
            if value is not None:
                return value
    if "json" in files:
        try:
            value = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if isinstance(value, dict):
            value = next((value[k] for k in ("label", "cls", "class") if k in value), None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class ShardDataset(IterableDataset):
    """Images streamed from tar shards, split across ranks and DataLoader workers, shuffled with a buffer.

    Args:
        urls: Shard paths or patterns, see :func:`expand_urls`.
        transform: ``transform(image, rng) -> image`` on the RGB PIL image (e.g. ``RandomResizedCropPaper``).
        labels: Require an integer label in each sample (``cls`` / ``txt`` / ``json``); otherwise labels are -1.
        shuffle: Shuffle the shard order per epoch and samples through a buffer. False reads in order.
        shuffle_buffer: Samples held in the shuffle buffer (raw bytes) per reader.
        seed: Seed of the shard order, the buffer, and the per-sample augmentation.
        samples_per_epoch: Total samples per epoch over all ranks; each rank yields ``samples_per_epoch //
            world_size``. None: one pass over the shards.
        max_bad_fraction: Stop when more than this fraction of the samples read are bad.
        alpha: Transparency rule, see :func:`~fvq.data.images.to_rgb`.
        rank: Rank override (default: torch.distributed's rank when initialised, else 0).
        world_size: World size override (default: torch.distributed's, else 1).

    Yields ``ImageSample(image (3, S, S) float32 in [-1, 1], label int64 ())``.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        transform: ImageTransform,
        labels: bool = False,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        max_bad_fraction: float = 0.01,
        alpha: AlphaPolicy = "white",
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if not callable(transform):
            raise TypeError(f"transform must be callable(image, rng) -> image, got {type(transform).__name__}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1 or None, got {samples_per_epoch}")
        self.shards = expand_urls(urls)
        self._shard_ids = {path: index for index, path in enumerate(self.shards)}
        self.transform = transform
        self.labels = bool(labels)
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.samples_per_epoch = samples_per_epoch
        self.alpha: AlphaPolicy = alpha
        self._rank, self._world_size = rank, world_size
        placement(rank, world_size)  # validate now
        self.bad_files = BadFilePolicy(max_bad_fraction=max_bad_fraction)
        self.bad_files.description = f"{len(self.shards)} shards ({self.shards[0]} ...)"
        self._epoch = SharedEpoch()
        self._skip_batches = torch.zeros(2, dtype=torch.int64).share_memory_()  # (batches, batch_size)
        logger.info("using %d tar shards from %s", len(self.shards), urls)

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int, *, skip_batches: int = 0, batch_size: int = 1) -> None:
        """Set the epoch (shard order, buffer, augmentation) and, to resume, how many batches to skip.

        Skipping assumes the DataLoader's order: with ``W`` workers, batch ``b`` comes from worker ``b % W``; each
        worker drops its share of the first ``skip_batches`` batches. Resume is exact when ``samples_per_epoch`` is
        set (each reader's stream is then a fixed function of the epoch).
        """
        if skip_batches < 0 or batch_size < 1:
            raise ValueError(f"need skip_batches >= 0 and batch_size >= 1, got {skip_batches} and {batch_size}")
        self._epoch.set(epoch)
        self._skip_batches[0] = int(skip_batches)
        self._skip_batches[1] = int(batch_size)

    def _reader(self) -> tuple[int, int, int, int]:
        """(rank, world_size, worker id, number of workers)."""
        rank, world = placement(self._rank, self._world_size)
        info = get_worker_info()
        return rank, world, (info.id if info else 0), (info.num_workers if info else 1)

    def _quota(self) -> int | None:
        """Samples this reader yields per epoch (None: one pass)."""
        if self.samples_per_epoch is None:
            return None
        _, world, worker, workers = self._reader()
        per_rank = self.samples_per_epoch // world
        return per_rank // workers + (1 if worker < per_rank % workers else 0)

    def __len__(self) -> int:
        """Samples per rank per epoch; defined only when ``samples_per_epoch`` is set."""
        if self.samples_per_epoch is None:
            raise TypeError("ShardDataset has no length without samples_per_epoch (an epoch is one pass)")
        _, world = placement(self._rank, self._world_size)
        return self.samples_per_epoch // world

    def _raw_stream(self, epoch: int) -> Iterator[TarSample]:
        """This reader's samples, in shard order, repeating passes while a quota asks for more."""
        rank, world, worker, workers = self._reader()
        readers, reader = world * workers, rank * workers + worker
        passes = 0
        while True:
            order = list(self.shards)
            if self.shuffle:
                sample_rng(self.seed, epoch, passes).shuffle(order)
            by_shard = len(order) >= readers
            if not by_shard and passes == 0 and worker == 0 and rank == 0:
                logger.warning(
                    "%d shards for %d readers (ranks x workers): every reader opens every shard and keeps 1 sample "
                    "in %d; write more, smaller shards for efficient reading",
                    len(order),
                    readers,
                    readers,
                )
            mine = order[reader::readers] if by_shard else order
            produced = 0
            counter = 0
            for path in mine:
                try:
                    for sample in iter_tar_samples(path):
                        if not by_shard:
                            counter += 1
                            if (counter - 1) % readers != reader:
                                continue
                        sample.repeat = passes
                        produced += 1
                        yield sample
                except ShardReadError as error:
                    self.bad_files.record_bad(path, error)
            passes += 1
            if self._quota() is None:
                return
            if produced == 0:
                raise RuntimeError(f"reader {reader} of {readers} got no sample from {len(mine)} shards")

    def _shuffled(self, stream: Iterator[TarSample], epoch: int) -> Iterator[TarSample]:
        if not self.shuffle or self.shuffle_buffer == 1:
            yield from stream
            return
        rank, _, worker, _ = self._reader()
        rng = sample_rng(self.seed, epoch, rank, worker, 1)
        buffer: list[TarSample] = []
        for sample in stream:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            slot = int(rng.integers(len(buffer)))
            buffer[slot], sample = sample, buffer[slot]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, sample: TarSample, epoch: int) -> ImageSample | None:
        where = f"{sample.shard}:{sample.key}"
        ext = _image_member(sample.files)
        if ext is None:
            self.bad_files.record_bad(where, f"no image member (found {sorted(sample.files)})")
            return None
        label = _label_of(sample.files)
        if self.labels and label is None:
            self.bad_files.record_bad(where, f"no integer label in cls/txt/json (found {sorted(sample.files)})")
            return None
        try:
            decoded = decode_image(sample.files[ext], name=where, alpha=self.alpha)
        except BadImageError as error:
            self.bad_files.record_bad(where, error)
            return None
        self.bad_files.record_ok(converted=decoded.converted)
        rng = sample_rng(self.seed, epoch, sample.repeat, self._shard_ids[sample.shard], sample.position)
        image = self.transform(decoded.image, rng)
        return make_sample(to_tensor(image), label if (self.labels and label is not None) else -1)

    def __iter__(self) -> Iterator[ImageSample]:
        epoch = self.epoch
        _, _, worker, workers = self._reader()
        skip_batches, batch_size = (int(v) for v in self._skip_batches.tolist())
        to_skip = (skip_batches // workers + (1 if worker < skip_batches % workers else 0)) * batch_size
        quota = self._quota()
        produced = 0
        for raw in self._shuffled(self._raw_stream(epoch), epoch):
            if quota is not None and produced >= quota:
                return
            item = self._decode(raw, epoch)
            if item is None:
                continue
            produced += 1
            if produced <= to_skip:
                continue
            yield item

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shards={len(self.shards)}, transform={self.transform!r}, labels={self.labels})"


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Write samples into numbered tar shards, starting a new shard every ``samples_per_shard`` samples.

    Shards are written under a temporary name and renamed when complete; member metadata is fixed (mtime 0,
    uid 0, mode 644), so the same input gives byte-identical shards.

    Args:
        output_dir: Folder for the shards (created).
        prefix: Shard names are ``{prefix}-{index:06d}.tar``.
        samples_per_shard: Samples per shard.

    Use as a context manager; ``paths`` lists the shards written.
    """

    def __init__(self, output_dir: str | os.PathLike, *, prefix: str = "data", samples_per_shard: int = 1000) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.samples_per_shard = int(samples_per_shard)
        self.paths: list[Path] = []
        self._archive: tarfile.TarFile | None = None
        self._count = 0
        self._keys: set[str] = set()

    def _roll(self) -> None:
        self._close_current()
        path = self.output_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
        self.paths.append(path)
        self._archive = tarfile.open(path.with_suffix(".tar.tmp"), mode="w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _close_current(self) -> None:
        if self._archive is not None:
            self._archive.close()
            os.replace(self.paths[-1].with_suffix(".tar.tmp"), self.paths[-1])
            self._archive = None

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Add one sample: ``files`` maps extensions (``"jpg"``, ``"cls"``) to contents; ``key`` has no dot."""
        if "." in os.path.basename(key) or not key:
            raise ValueError(f"sample keys must be non-empty with no dot in the file name, got {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if not files:
            raise ValueError(f"sample {key!r} has no files")
        if self._archive is None or self._count >= self.samples_per_shard:
            self._roll()
        self._keys.add(key)
        for ext, data in files.items():
            self._archive.addfile(_tar_info(f"{key}.{ext.lstrip('.')}", len(data)), io.BytesIO(data))
        self._count += 1

    def close(self) -> None:
        """Finish the last shard."""
        self._close_current()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_shards_from_folder(
    root: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    prefix: str = "data",
    samples_per_shard: int = 1000,
    labels: bool = False,
    shuffle_seed: int | None = 0,
) -> list[Path]:
    """Pack the images of a folder into tar shards (file bytes copied as they are, not re-encoded).

    Args:
        root: Image folder (ImageNet layout when ``labels``), scanned like :class:`~fvq.data.folder.ImageFolder`.
        output_dir: Where to write ``{prefix}-000000.tar``, ...
        prefix: Shard name prefix.
        samples_per_shard: Samples per shard.
        labels: Store the class index of each image as a ``cls`` member.
        shuffle_seed: Shuffle the file order with this seed before writing, so that each shard mixes classes;
            None keeps the sorted order.

    Returns:
        The shard paths, in order. Read them back with ``ShardDataset(f"{output_dir}/{prefix}-*.tar", ...)``.
    """
    paths, targets, _ = scan_images(root, labels=labels)
    order = np.arange(len(paths))
    if shuffle_seed is not None:
        sample_rng(shuffle_seed).shuffle(order)
    with ShardWriter(output_dir, prefix=prefix, samples_per_shard=samples_per_shard) as writer:
        for number, index in enumerate(order):
            ext = os.path.splitext(paths[index])[1].lower().lstrip(".")
            files = {ext: Path(paths[index]).read_bytes()}
            if labels:
                files["cls"] = str(targets[index]).encode()
            writer.write(f"{number:09d}", files)
    logger.info("wrote %d images into %d shards in %s", len(paths), len(writer.paths), output_dir)
    return writer.paths
