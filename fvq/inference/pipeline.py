"""Images <-> tokens, batch by batch: the pipelines behind ``fvq encode``, ``decode`` and ``reconstruct``.

Inputs are image files and folders (:func:`collect_images`); each image is decoded to RGB, centre-cropped by an
evaluation protocol (:class:`fvq.data.transforms.EvalCrop`) and encoded in batches (:func:`iter_encoded`,
:func:`encode_images`), or cut into several views (:class:`fvq.data.tokens.ViewCrops`: flips, LlamaGen's ten-crop)
that are encoded together (:func:`iter_encoded_views`) into a sharded token store for training the generator
(:func:`encode_store`, one or many processes). Token files decode back to images (:func:`iter_decoded`,
:func:`decode_tokens`) written as 8-bit PNGs named after their sources (:func:`output_names`, :func:`write_images`);
:func:`reconstruct_images` does both in one pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fvq.data.grids import save_reconstruction_grid
from fvq.data.images import AlphaPolicy, BadFilePolicy, BadImageError, decode_image
from fvq.data.tokens import (
    META_NAME,
    ViewCrops,
    ViewSpec,
    complete_shard,
    shard_files,
    storage_dtype,
    store_files,
    temporary_files,
    write_meta,
    write_shard,
)
from fvq.data.transforms import EVAL_CROPS, to_pil, to_tensor
from fvq.distributed import any_rank, barrier, placement
from fvq.evaluation.metrics import psnr
from fvq.inference.loading import LoadedModel
from fvq.inference.tokens import TokenFile, check_tokens, save_tokens
from fvq.models.tokenizer import Tokenizer
from fvq.weights import atomic_write_bytes

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "EncodedBatch",
    "EncodedViews",
    "ImageSource",
    "OutputsExistError",
    "ReconstructionReport",
    "StoreReport",
    "collect_images",
    "decode_tokens",
    "encode_images",
    "encode_store",
    "existing_outputs",
    "iter_decoded",
    "iter_encoded",
    "iter_encoded_views",
    "labelled_images",
    "output_names",
    "reconstruct_images",
    "write_images",
]

logger = logging.getLogger(__name__)

GRID_NAME = "reconstruction_grid.png"
DEFAULT_SHARD_SIZE = 10_000
"""Input files per shard of a token store (ImageNet's 1,281,167 images make 129 shards)."""
LabelSource = Literal["none", "subfolders"]


class OutputsExistError(ValueError):
    """Files to be written exist already (``overwrite=True`` replaces them)."""


# ---------------------------------------------------------------------------------------------------------------------
# images in
@dataclass(frozen=True)
class ImageSource:
    """One input file: its ``path`` and the ``name`` recorded for it (relative to the folder it was found in)."""

    path: str
    name: str


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[ImageSource]:
    """Expand files and folders into image files, in the order given; folders are scanned recursively, sorted,
    hidden files skipped, by extension (:func:`fvq.data.folder.scan_images`). Files named directly are kept
    whatever their extension (a file that is no image is skipped later as bad).

    Returns:
        One :class:`ImageSource` per file; a folder's files are named relative to that folder.
    """
    from fvq.data.folder import scan_images

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no input images given: pass image files and/or folders")
    found: list[ImageSource] = []
    for item in inputs:
        path = os.fspath(item)
        if os.path.isdir(path):
            paths, _, _ = scan_images(path)
            found.extend(ImageSource(p, PurePosixPath(*Path(os.path.relpath(p, path)).parts).as_posix()) for p in paths)
        elif os.path.isfile(path):
            found.append(ImageSource(path, os.path.basename(path)))
        else:
            raise FileNotFoundError(f"input {path!r} is neither an image file nor a folder")
    return found


def labelled_images(folder: str | os.PathLike) -> tuple[list[ImageSource], list[int], list[str]]:
    """The images of an ImageNet-style folder (one subfolder per class) with their class ids, as torchvision's
    ``ImageFolder`` numbers them: the sorted subfolder names are classes ``0 .. C-1`` (hidden folders skipped, files
    directly in ``folder`` ignored with a warning; :func:`fvq.data.folder.scan_images`).

    Returns:
        ``(sources, labels, class_names)``: one :class:`ImageSource` (named relative to ``folder``) and one class id
        per image, class by class and sorted within each class; the sorted class names.
    """
    from fvq.data.folder import scan_images

    root = os.fspath(folder)
    if not os.path.isdir(root):
        raise ValueError(f"labels from subfolders need one folder of class subfolders as input, got {root!r}")
    paths, labels, classes = scan_images(root, labels=True)
    names = [PurePosixPath(*Path(os.path.relpath(p, root)).parts).as_posix() for p in paths]
    return [ImageSource(p, n) for p, n in zip(paths, names)], labels, classes


class _CroppedImages(Dataset):
    """Decode + crops, returning ``(position, views (V, 3, S, S) or None, converted, error or None)``."""

    def __init__(
        self, sources: Sequence[ImageSource], crop: Callable[[Image.Image], list[Image.Image]], alpha: AlphaPolicy
    ) -> None:
        self.sources, self.crop, self.alpha = list(sources), crop, alpha

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, position: int) -> tuple[int, Tensor | None, bool, str | None]:
        try:
            decoded = decode_image(self.sources[position].path, alpha=self.alpha)
        except BadImageError as error:
            return position, None, False, str(error)
        views = torch.stack([to_tensor(view) for view in self.crop(decoded.image)])  # (V, 3, S, S)
        return position, views, decoded.converted, None


@dataclass
class EncodedBatch:
    """One batch from :func:`iter_encoded`.

    Attributes:
        names: Source names of the images, in order.
        images: The cropped inputs, ``(B, 3, S, S)`` in [-1, 1], on the CPU.
        indices: int64 ``(B, h, w)`` (or ``(B, h, w, c)``), on the CPU.
        positions: Positions of the images in the ``sources`` sequence given.
        skipped: Source names of the unreadable files left out of this batch.
    """

    names: list[str]
    images: Tensor
    indices: Tensor
    positions: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class EncodedViews:
    """One batch from :func:`iter_encoded_views`.

    Attributes:
        names: Source names of the images, in order.
        images: The views, ``(B, V, 3, S, S)`` in [-1, 1], on the CPU.
        indices: int64 ``(B, V, h, w)`` (or ``(B, V, h, w, c)``), on the CPU.
        positions: Positions of the images in the ``sources`` sequence given.
        skipped: Source names of the unreadable files left out of this batch.
    """

    names: list[str]
    images: Tensor
    indices: Tensor
    positions: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _check_protocol(protocol: str) -> str:
    if protocol not in EVAL_CROPS:
        raise ValueError(f"protocol must be one of {tuple(EVAL_CROPS)}, got {protocol!r}")
    return protocol


def _progress(total: int, desc: str, unit: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def _check_loader_arguments(batch_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def _encode_batches(
    tokenizer: Tokenizer,
    sources: Sequence[ImageSource],
    crops: ViewCrops,
    batches: Sequence[Sequence[int]],
    *,
    num_workers: int,
    alpha: AlphaPolicy,
    bad_files: BadFilePolicy,
    bar: Any,
) -> Iterator[EncodedViews]:
    """Decode, cut and encode the images at the given positions, one batch per list of ``batches``, in order."""
    size, views = crops.image_size, crops.spec.count
    h, w = tokenizer.latent_shape(size, size)
    codes = int(getattr(tokenizer.quantizer, "codes_per_position", 1))
    empty = torch.zeros(0, views, h, w, *([codes] if codes > 1 else []), dtype=torch.int64)
    device = tokenizer.quant_conv.weight.device
    loader = DataLoader(
        _CroppedImages(sources, crops, alpha), batch_sampler=batches, num_workers=num_workers, collate_fn=list
    )
    for items in loader:
        names, images, positions, skipped = [], [], [], []
        for position, image, converted, error in items:
            if image is None:
                bad_files.record_bad(sources[position].path, error or "unreadable")
                skipped.append(sources[position].name)
                continue
            bad_files.record_ok(converted=converted)
            names.append(sources[position].name)
            positions.append(position)
            images.append(image)
        bar.update(len(items))
        if not images:
            yield EncodedViews(names=[], images=torch.zeros(0, views, 3, size, size), indices=empty, skipped=skipped)
            continue
        batch = torch.stack(images)  # (B, V, 3, S, S)
        with torch.inference_mode():
            indices = tokenizer.encode(batch.flatten(0, 1).to(device))  # (B * V, h, w[, c])
        indices = indices.cpu().unflatten(0, (len(images), views))  # (B, V, h, w[, c])
        yield EncodedViews(names=names, images=batch, indices=indices, positions=positions, skipped=skipped)


def _chunks(positions: Sequence[int], size: int) -> list[list[int]]:
    return [list(positions[i : i + size]) for i in range(0, len(positions), size)]


def iter_encoded_views(
    tokenizer: Tokenizer,
    sources: Sequence[ImageSource],
    *,
    image_size: int,
    views: ViewSpec | str = "center",
    protocol: str = "llamagen",
    batch_size: int = 32,
    num_workers: int = 0,
    alpha: AlphaPolicy = "white",
    bad_files: BadFilePolicy | None = None,
    progress: bool = False,
) -> Iterator[EncodedViews]:
    """Decode images, cut each into its views (:class:`~fvq.data.tokens.ViewCrops`) and encode them, batch by batch.
    Unreadable files are skipped, logged and counted.

    Args:
        tokenizer: Model in eval mode (on the device to use).
        sources: From :func:`collect_images`.
        image_size: Side ``S`` of each view; divisible by the model's downsampling factor.
        views: ``"center"``, ``"flip"``, ``"tencrop"``, ``"tencrop+1.05"``... (:class:`~fvq.data.tokens.ViewSpec`).
        protocol: Crop of the ``center`` and ``flip`` views (``"llamagen"`` or ``"fvq"``).
        batch_size: Images per forward pass (each with its ``V`` views: ``batch_size * V`` crops).
        num_workers: DataLoader processes decoding and cutting images.
        alpha: Transparency rule, see :func:`fvq.data.images.to_rgb`.
        bad_files: Counts and logs unreadable files and stops once too many are bad (default: never stops).
        progress: Show a progress bar.

    Yields:
        :class:`EncodedViews` with views ``(B, V, 3, S, S)`` and indices ``(B, V, h, w[, c])``.
    """
    _check_loader_arguments(batch_size, num_workers)
    tokenizer.latent_shape(image_size, image_size)
    crops = ViewCrops(views, image_size, _check_protocol(protocol))
    policy = bad_files if bad_files is not None else BadFilePolicy(max_bad_fraction=1.0, min_seen=1)
    batches = _chunks(range(len(sources)), batch_size)
    with _progress(len(sources), "encode", "img", progress) as bar:
        yield from _encode_batches(
            tokenizer, sources, crops, batches, num_workers=num_workers, alpha=alpha, bad_files=policy, bar=bar
        )


def iter_encoded(
    tokenizer: Tokenizer,
    sources: Sequence[ImageSource],
    *,
    image_size: int,
    protocol: str = "llamagen",
    batch_size: int = 32,
    num_workers: int = 0,
    alpha: AlphaPolicy = "white",
    bad_files: BadFilePolicy | None = None,
    progress: bool = False,
) -> Iterator[EncodedBatch]:
    """Decode, crop and encode images batch by batch. Unreadable files are skipped, logged and counted.

    Args:
        tokenizer: Model in eval mode (on the device to use).
        sources: From :func:`collect_images`.
        image_size: Side of the square crop; divisible by the model's downsampling factor.
        protocol: ``"llamagen"`` (short side resized to ``image_size``, centre crop) or ``"fvq"`` (centre crop of
            the raw image); see :class:`fvq.data.transforms.EvalCrop`.
        batch_size: Images per forward pass (batches holding bad files come out smaller).
        num_workers: DataLoader processes decoding images.
        alpha: Transparency rule, see :func:`fvq.data.images.to_rgb`.
        bad_files: Counts and logs unreadable files and stops once too many are bad (default: never stops).
        progress: Show a progress bar.

    Yields:
        :class:`EncodedBatch` with images ``(B, 3, S, S)`` and indices ``(B, h, w[, c])``; a batch of only bad
        files yields empty tensors and its ``skipped`` names.
    """
    for batch in iter_encoded_views(
        tokenizer,
        sources,
        image_size=image_size,
        views="center",
        protocol=protocol,
        batch_size=batch_size,
        num_workers=num_workers,
        alpha=alpha,
        bad_files=bad_files,
        progress=progress,
    ):
        yield EncodedBatch(
            names=batch.names,
            images=batch.images[:, 0],  # (B, 3, S, S)
            indices=batch.indices[:, 0],  # (B, h, w[, c])
            positions=batch.positions,
            skipped=batch.skipped,
        )


def encode_images(
    model: Tokenizer | LoadedModel,
    paths: Sequence[str | os.PathLike] | Sequence[ImageSource],
    *,
    image_size: int | None = None,
    protocol: str | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    alpha: AlphaPolicy = "white",
    max_bad_fraction: float = 1.0,
    progress: bool = False,
) -> TokenFile:
    """Encode image files (or folders of them) into a :class:`TokenFile`.

    Args:
        model: A :class:`Tokenizer` in eval mode on the device to use (a training model with a projector gives the
            same ids as its export), or a :class:`LoadedModel` from :func:`~fvq.inference.loading.load_model`.
        paths: Image files and folders (see :func:`collect_images`), or :class:`ImageSource` items.
        image_size: Crop size; default: the training image size recorded for the model, else required.
        protocol: Crop protocol, ``"llamagen"`` or ``"fvq"``; default: the one recorded for the model, else
            ``"llamagen"``.
        batch_size: Images per forward pass.
        num_workers: DataLoader processes decoding images.
        alpha: Transparency rule for images with an alpha channel.
        max_bad_fraction: Stop (``TooManyBadFilesError``) once more than this fraction of the files are unreadable;
            the default 1.0 only skips them.
        progress: Show a progress bar.

    Returns:
        A :class:`TokenFile` with int64 indices ``(N, h, w)`` (or ``(N, h, w, c)``), ``N`` readable images.
    """
    loaded = LoadedModel.of(model)
    tokenizer = loaded.tokenizer
    if paths and all(isinstance(p, ImageSource) for p in paths):
        sources = list(paths)
    else:
        sources = collect_images(paths)  # type: ignore[arg-type]
    if image_size is None:
        if loaded.image_size is None:
            raise ValueError(
                "image_size is required: the model records no training image size (give the crop size, e.g. 256)"
            )
        image_size = loaded.image_size
    protocol = protocol or loaded.protocol or "llamagen"
    policy = BadFilePolicy(max_bad_fraction=max_bad_fraction, min_seen=min(100, max(1, len(sources))))
    policy.description = "the input images"
    names: list[str] = []
    skipped: list[str] = []
    chunks: list[Tensor] = []
    for batch in iter_encoded(
        tokenizer,
        sources,  # type: ignore[arg-type]
        image_size=image_size,
        protocol=protocol,
        batch_size=batch_size,
        num_workers=num_workers,
        alpha=alpha,
        bad_files=policy,
        progress=progress,
    ):
        names.extend(batch.names)
        skipped.extend(batch.skipped)
        chunks.append(batch.indices)
    if not names:
        raise ValueError(f"none of the {len(sources)} input files could be decoded as an image: {skipped[:5]}")
    return TokenFile(
        indices=torch.cat(chunks),
        codebook_size=tokenizer.codebook_size,
        model_identity=loaded.identity,
        sources=names,
        image_size=int(image_size),
        protocol=protocol,
        downsample_factor=tokenizer.downsample_factor,
        skipped=skipped,
        model_weights_sha256=loaded.weights_sha256,
        model_config_sha256=loaded.config_sha256,
    )


@dataclass
class StoreReport:
    """What :func:`encode_store` did.

    Attributes:
        path: The store folder.
        meta: Its ``meta.json`` (the whole store, whichever process encoded which shard).
        encoded: Shards this process encoded.
        reused: Shards this process found complete and intact (``resume=True``) and kept.
        skipped: Unreadable input files over the whole store (on rank 0; empty on the others).
    """

    path: Path
    meta: dict[str, Any]
    encoded: list[int]
    reused: list[int]
    skipped: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return int(self.meta["num_images"])

    @property
    def num_shards(self) -> int:
        return len(self.meta["shards"])


def _names_digest(sources: Sequence[ImageSource], labels: Sequence[int]) -> str:
    digest = hashlib.sha256()
    for source, label in zip(sources, labels):
        digest.update(json.dumps([source.name, int(label)]).encode() + b"\n")
    return digest.hexdigest()


def _prepare_folder(out_dir: Path, *, resume: bool, overwrite: bool, is_main: bool) -> None:
    """Refuse to mix with an existing store unless asked; rank 0 removes the old store's files (``overwrite``) or the
    temporary files an interrupted run left."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder; a token store is a folder")
    if resume and overwrite:
        raise ValueError("give resume (continue an interrupted encoding) or overwrite (start again), not both")
    existing = store_files(out_dir)
    if existing and not (resume or overwrite):
        finished = (out_dir / META_NAME).exists()
        raise ValueError(
            f"{out_dir} already holds a {'token store' if finished else 'partly encoded token store'}; pass "
            f"--resume to {'check it and keep it' if finished else 'finish it'}, --overwrite to start again, or "
            f"choose another folder"
        )
    barrier()  # every rank has looked before rank 0 changes anything
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in existing if overwrite else temporary_files(out_dir):
            path.unlink(missing_ok=True)
    barrier()


def encode_store(
    model: Tokenizer | LoadedModel,
    paths: Sequence[str | os.PathLike] | Sequence[ImageSource],
    out_dir: str | os.PathLike,
    *,
    image_size: int | None = None,
    protocol: str | None = None,
    views: ViewSpec | str = "center",
    labels: LabelSource = "none",
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 32,
    num_workers: int = 0,
    alpha: AlphaPolicy = "white",
    max_bad_fraction: float = 1.0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> StoreReport:
    """Encode images into a token store (format version 2, see :mod:`fvq.data.tokens`) for training the generator.

    The sorted input list is cut into shards of ``shard_size`` input files. Under ``torchrun`` (a process group set
    up, e.g. by :func:`fvq.distributed.init_distributed`) every rank calls this and encodes a contiguous run of
    shards; the shards are the same whatever the number of processes, since each is encoded on its own in batches
    that never cross it. Each shard is written atomically; with ``resume`` the shards already complete, encoded with
    the same settings and matching their SHA-256, are kept. Rank 0 writes ``meta.json`` once every shard is there.

    Args:
        model: A :class:`Tokenizer` in eval mode on the device to use, or a :class:`LoadedModel`.
        paths: Image files and folders (:func:`collect_images`), or :class:`ImageSource` items; with
            ``labels="subfolders"`` one folder of class subfolders.
        out_dir: The store folder (created).
        image_size: Side of each view; default: the training image size recorded for the model, else required.
        protocol: Crop of the ``center`` / ``flip`` views (``"llamagen"`` or ``"fvq"``; default: the model's, else
            ``"llamagen"``). Ten-crop views always start from ADM's centre crop (``"llamagen"``).
        views: ``"center"`` (1 view), ``"flip"`` (2), ``"tencrop"`` (10, LlamaGen's), ``"tencrop+1.05"`` (20).
        labels: ``"none"`` (labels -1) or ``"subfolders"`` (ImageNet layout, :func:`labelled_images`).
        shard_size: Input files per shard.
        batch_size: Images per forward pass (each with its views).
        num_workers: DataLoader processes decoding and cutting images, per rank.
        alpha: Transparency rule for images with an alpha channel.
        max_bad_fraction: Stop (``TooManyBadFilesError``) once more than this fraction of a rank's files are
            unreadable; the default 1.0 only skips them.
        resume: Keep the complete shards of an interrupted encoding (settings must match) and encode the rest.
        overwrite: Remove an existing store in ``out_dir`` first.
        progress: Show a progress bar (rank 0).

    Raises:
        ValueError: ``out_dir`` holds a store and neither ``resume`` nor ``overwrite`` is given, or it was begun
            with other settings (model, views, inputs...); bad arguments.

    Returns:
        A :class:`StoreReport` (on every rank).
    """
    loaded = LoadedModel.of(model)
    tokenizer = loaded.tokenizer
    out_dir = Path(out_dir)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    spec = ViewSpec.parse(views)
    if spec.kind == "tencrop":
        if protocol not in (None, "llamagen"):
            raise ValueError(
                f"ten-crop views are cut from ADM's centre crop as LlamaGen does (protocol 'llamagen'); protocol "
                f"{protocol!r} applies to the 'center' and 'flip' views"
            )
        protocol = "llamagen"
    protocol = _check_protocol(protocol or loaded.protocol or "llamagen")
    if image_size is None:
        if loaded.image_size is None:
            raise ValueError(
                "image_size is required: the model records no training image size (give the crop size, e.g. 256)"
            )
        image_size = loaded.image_size
    h, w = tokenizer.latent_shape(image_size, image_size)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    _check_loader_arguments(batch_size, num_workers)
    if labels == "subfolders":
        if len(paths) != 1 or isinstance(paths[0], ImageSource):
            raise ValueError(f"labels from subfolders need exactly one input folder (ImageNet layout), got {paths}")
        sources, targets, class_names = labelled_images(paths[0])  # type: ignore[arg-type]
    elif labels == "none":
        if paths and all(isinstance(p, ImageSource) for p in paths):
            sources = list(paths)  # type: ignore[arg-type]
        else:
            sources = collect_images(paths)  # type: ignore[arg-type]
        targets, class_names = [-1] * len(sources), []
    else:
        raise ValueError(f"labels must be 'none' or 'subfolders', got {labels!r}")
    if not sources:
        raise ValueError("no input images found")
    codebook_size = tokenizer.codebook_size
    codes = int(getattr(tokenizer.quantizer, "codes_per_position", 1))
    dtype = storage_dtype(codebook_size)
    settings = {
        "model_identity": loaded.identity,
        "model_weights_sha256": loaded.weights_sha256,
        "model_config_sha256": loaded.config_sha256,
        "codebook_size": codebook_size,
        "grid": [h, w],
        "codes_per_position": codes,
        "downsample_factor": tokenizer.downsample_factor,
        "dtype": dtype.name,
        "image_size": int(image_size),
        "protocol": protocol,
        "views": str(spec),
        "alpha": alpha,
        "labels": labels,
        "class_names": list(class_names),
        "num_inputs": len(sources),
        "inputs_sha256": _names_digest(sources, targets),
        "shard_size": shard_size,
    }
    rank, world_size = placement()
    _prepare_folder(out_dir, resume=resume, overwrite=overwrite, is_main=rank == 0)

    # This rank's shards: a contiguous run, the same shards whatever the number of ranks.
    num_shards = -(-len(sources) // shard_size)
    mine = range(rank * num_shards // world_size, (rank + 1) * num_shards // world_size)
    device = tokenizer.quant_conv.weight.device
    encoded: list[int] = []
    reused: list[int] = []
    failure: Exception | None = None
    try:
        todo = []
        for shard in mine:
            if resume and complete_shard(out_dir, shard, settings) is not None:
                reused.append(shard)
            else:
                todo.append(shard)
        if reused:
            logger.info("rank %d keeps %d complete shard(s) of %s", rank, len(reused), out_dir)
        crops = ViewCrops(spec, image_size, protocol)
        policy = BadFilePolicy(max_bad_fraction=max_bad_fraction, min_seen=min(100, len(sources)))
        policy.description = "the input images"
        plan = [
            (shard, batch) for shard in todo for batch in _chunks(_shard_range(shard, shard_size, sources), batch_size)
        ]
        total = sum(len(batch) for _, batch in plan)
        with _progress(total, "encode", "img", progress and rank == 0) as bar:
            results = _encode_batches(
                tokenizer,
                sources,
                crops,
                [batch for _, batch in plan],
                num_workers=num_workers,
                alpha=alpha,
                bad_files=policy,
                bar=bar,
            )
            pending: list[EncodedViews] = []
            for index, ((shard, _), result) in enumerate(zip(plan, results)):
                pending.append(result)
                if index + 1 == len(plan) or plan[index + 1][0] != shard:
                    _write_encoded_shard(out_dir, shard, pending, sources, targets, settings, codebook_size, dtype)
                    encoded.append(shard)
                    pending = []
    except Exception as error:  # every rank must reach the collective below, or the others would wait forever
        failure = error
    if any_rank(failure is not None, device):
        if failure is not None:
            raise failure
        raise RuntimeError("another process failed while encoding the token store; see its error")

    barrier()
    if rank == 0:
        entries = []
        for shard in range(num_shards):
            entry = complete_shard(out_dir, shard, settings, check_sha256=False)
            if entry is None:
                raise RuntimeError(f"shard {shard_files(shard)[2]} of {out_dir} is missing after encoding")
            entries.append(entry)
        write_meta(out_dir, settings, entries)
    barrier()
    meta = json.loads((out_dir / META_NAME).read_text())
    skipped = []
    if rank == 0:
        for shard in range(num_shards):
            skipped.extend(json.loads((out_dir / shard_files(shard)[2]).read_text()).get("skipped", []))
    return StoreReport(path=out_dir, meta=meta, encoded=encoded, reused=reused, skipped=skipped)


def _shard_range(shard: int, shard_size: int, sources: Sequence[ImageSource]) -> range:
    return range(shard * shard_size, min((shard + 1) * shard_size, len(sources)))


def _write_encoded_shard(
    out_dir: Path,
    shard: int,
    batches: Sequence[EncodedViews],
    sources: Sequence[ImageSource],
    targets: Sequence[int],
    settings: dict[str, Any],
    codebook_size: int,
    dtype: np.dtype,
) -> None:
    """Check the ids of one shard's batches and write the shard."""
    indices = torch.cat([b.indices for b in batches])  # (N_k, V, h, w[, c])
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= codebook_size):
        raise ValueError(
            f"the model emitted ids in [{int(indices.min())}, {int(indices.max())}] for a codebook of {codebook_size}"
        )
    positions = [p for b in batches for p in b.positions]
    span = _shard_range(shard, int(settings["shard_size"]), sources)
    write_shard(
        out_dir,
        shard,
        tokens=indices.numpy().astype(dtype),
        labels=np.asarray([targets[p] for p in positions], dtype=np.int64),
        sources=[sources[p].name for p in positions],
        skipped=[name for b in batches for name in b.skipped],
        first_input=span.start,
        inputs=len(span),
        settings=settings,
    )


# ---------------------------------------------------------------------------------------------------------------------
# tokens out
def iter_decoded(
    tokenizer: Tokenizer, tokens: TokenFile, *, batch_size: int = 32, progress: bool = False
) -> Iterator[tuple[int, Tensor]]:
    """Decode a token file batch by batch (call :func:`check_tokens` first).

    Yields:
        ``(start, images)``: the position of the batch's first image and its images ``(B, 3, H, W)`` in [-1, 1]
        (clamped), float32 on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = tokenizer.quant_conv.weight.device
    with _progress(tokens.num_images, "decode", "img", progress) as bar:
        for start in range(0, tokens.num_images, batch_size):
            chunk = tokens.indices[start : start + batch_size].to(device)  # (B, h, w[, c])
            with torch.inference_mode():
                images = tokenizer.decode(chunk).clamp(-1, 1)  # (B, 3, H, W)
            bar.update(int(chunk.shape[0]))
            yield start, images.float().cpu()


def decode_tokens(
    model: Tokenizer | LoadedModel,
    tokens: TokenFile,
    *,
    batch_size: int = 32,
    force: bool = False,
    progress: bool = False,
) -> Tensor:
    """Decode a :class:`TokenFile` to images after :func:`check_tokens`.

    Args:
        model: The model that made the tokens: a :class:`Tokenizer` in eval mode or a :class:`LoadedModel`.
        tokens: The token file.
        batch_size: Images per decoder pass.
        force: Decode even when another model made the tokens.
        progress: Show a progress bar.

    Returns:
        ``(N, 3, H, W)`` float32 images in [-1, 1] (clamped), on the CPU.
    """
    loaded = LoadedModel.of(model)
    check_tokens(loaded, tokens, force=force)
    batches = iter_decoded(loaded.tokenizer, tokens, batch_size=batch_size, progress=progress)
    return torch.cat([images for _, images in batches])


def _safe_relative(name: str) -> PurePosixPath | None:
    """``name`` as a relative path inside the output folder, or ``None`` when it is absolute or climbs out."""
    path = PurePosixPath(name.replace("\\", "/"))
    if not name or path.is_absolute() or any(part in ("..", "") for part in path.parts) or ":" in path.parts[0]:
        return None
    return path


def output_names(sources: Sequence[str], count: int) -> list[str]:
    """PNG file names for ``count`` images: each source name with its extension replaced by ``.png``
    (``photos/cat.jpg`` -> ``photos/cat.png``); names that would collide keep their extension
    (``cat.jpg.png``); with no usable names (missing, unsafe, still colliding) ``000000.png``, ``000001.png``, ...
    """
    if len(sources) != count:
        return [f"{i:06d}.png" for i in range(count)]
    paths = [_safe_relative(s) for s in sources]
    if any(p is None for p in paths):
        return [f"{i:06d}.png" for i in range(count)]
    names = [p.with_suffix(".png").as_posix() for p in paths]  # type: ignore[union-attr]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    names = [f"{p.as_posix()}.png" if counts[n] > 1 else n for n, p in zip(names, paths)]  # type: ignore[union-attr]
    if len(set(names)) != len(names):
        return [f"{i:06d}.png" for i in range(count)]
    return names


def _png_bytes(image: Tensor) -> bytes:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(images: Tensor, names: Sequence[str], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``(B, 3, H, W)`` images in [-1, 1] as 8-bit PNGs ``out_dir/name`` (atomically, folders created)."""
    if images.ndim != 4 or images.shape[0] != len(names):
        raise ValueError(f"expected {len(names)} images (B, 3, H, W), got a tensor of shape {tuple(images.shape)}")
    out_dir = Path(out_dir)
    written = []
    for image, name in zip(images, names):
        path = out_dir / name
        atomic_write_bytes(path, _png_bytes(image))
        written.append(path)
    return written


def existing_outputs(out_dir: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """The files among ``out_dir/name`` that already exist."""
    out_dir = Path(out_dir)
    return [out_dir / n for n in names if (out_dir / n).exists()]


# ---------------------------------------------------------------------------------------------------------------------
# both at once
@dataclass
class ReconstructionReport:
    """What :func:`reconstruct_images` did.

    Attributes:
        sources: Source names of the images reconstructed, in order.
        skipped: Source names of the unreadable files left out.
        written: The PNG written for each image, in order.
        grid: The grid image written (rows of originals, each followed by their reconstructions).
        psnr: Per-image PSNR (RGB, 8-bit) of the reconstructions, ``(N,)`` float64; ``inf`` for an exact one.
        image_size: Side of the square crops.
        protocol: Crop protocol used.
        tokens_path: The token file written, or ``None``.
    """

    sources: list[str]
    skipped: list[str]
    written: list[Path]
    grid: Path
    psnr: Tensor
    image_size: int
    protocol: str
    tokens_path: Path | None = None

    @property
    def mean_psnr(self) -> float:
        """Mean PSNR over the images not reconstructed exactly (``inf`` when every image is exact)."""
        finite = self.psnr[torch.isfinite(self.psnr)]
        return float(finite.mean()) if finite.numel() else float("inf")


def reconstruct_images(
    model: LoadedModel,
    paths: Sequence[str | os.PathLike] | Sequence[ImageSource],
    out_dir: str | os.PathLike,
    *,
    image_size: int | None = None,
    protocol: str | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    alpha: AlphaPolicy = "white",
    max_bad_fraction: float = 1.0,
    grid_images: int = 32,
    tokens_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> ReconstructionReport:
    """Encode and decode images in one pass, as :func:`encode_images` then :func:`decode_tokens` do (the PNGs are the
    same), writing the reconstructions to ``out_dir`` named after the sources (:func:`output_names`) and the grid
    ``out_dir/reconstruction_grid.png`` of the first ``grid_images`` images.

    Args:
        model: From :func:`~fvq.inference.loading.load_model`.
        paths: Image files and folders (see :func:`collect_images`), or :class:`ImageSource` items.
        out_dir: Folder for the reconstructions and the grid (created).
        image_size: Crop size; default: the training image size recorded for the model, else required.
        protocol: Crop protocol, ``"llamagen"`` or ``"fvq"``; default: the one recorded for the model, else
            ``"llamagen"``.
        batch_size: Images per forward pass.
        num_workers: DataLoader processes decoding images.
        alpha: Transparency rule for images with an alpha channel.
        max_bad_fraction: Stop (``TooManyBadFilesError``) once more than this fraction of the files are unreadable;
            the default 1.0 only skips them.
        grid_images: Images shown in the grid (at least 1).
        tokens_path: Also write the token file of the images there.
        overwrite: Replace existing outputs.
        progress: Show a progress bar.

    Raises:
        OutputsExistError: Some outputs exist already and ``overwrite`` is False (nothing is written).

    Returns:
        A :class:`ReconstructionReport`.
    """
    if grid_images < 1:
        raise ValueError(f"grid_images must be >= 1, got {grid_images}")
    out_dir = Path(out_dir)
    if paths and all(isinstance(p, ImageSource) for p in paths):
        sources = list(paths)
    else:
        sources = collect_images(paths)  # type: ignore[arg-type]
    names = output_names([s.name for s in sources], len(sources))
    if GRID_NAME in names:
        raise ValueError(f"an input is named like the grid file {GRID_NAME}; rename it or write elsewhere")
    existing = existing_outputs(out_dir, [*names, GRID_NAME])
    if tokens_path is not None and Path(tokens_path).exists():
        existing.append(Path(tokens_path))
    if existing and not overwrite:
        raise OutputsExistError(
            f"{len(existing)} outputs exist already (e.g. {existing[0]}); pass overwrite=True or choose another "
            "output folder"
        )
    if image_size is None:
        if model.image_size is None:
            raise ValueError(
                "image_size is required: the model records no training image size (give the crop size, e.g. 256)"
            )
        image_size = model.image_size
    protocol = protocol or model.protocol or "llamagen"
    tokenizer = model.tokenizer
    device = tokenizer.quant_conv.weight.device
    policy = BadFilePolicy(max_bad_fraction=max_bad_fraction, min_seen=min(100, len(sources)))
    policy.description = "the input images"
    kept: list[str] = []
    skipped: list[str] = []
    written: list[Path] = []
    chunks: list[Tensor] = []
    scores: list[Tensor] = []
    grid_originals: list[Tensor] = []
    grid_recons: list[Tensor] = []
    for batch in iter_encoded(
        tokenizer,
        sources,
        image_size=image_size,
        protocol=protocol,
        batch_size=batch_size,
        num_workers=num_workers,
        alpha=alpha,
        bad_files=policy,
        progress=progress,
    ):
        skipped.extend(batch.skipped)
        if not batch.names:
            continue
        with torch.inference_mode():
            recon = tokenizer.decode(batch.indices.to(device)).clamp(-1, 1).float().cpu()  # (B, 3, S, S)
        written.extend(write_images(recon, [names[p] for p in batch.positions], out_dir))
        scores.append(psnr(batch.images, recon))  # (B,)
        kept.extend(batch.names)
        chunks.append(batch.indices)
        room = grid_images - sum(x.shape[0] for x in grid_originals)
        if room > 0:
            grid_originals.append(batch.images[:room])
            grid_recons.append(recon[:room])
    if not kept:
        raise ValueError(f"none of the {len(sources)} input files could be decoded as an image: {skipped[:5]}")
    grid = save_reconstruction_grid(
        torch.cat(grid_originals), torch.cat(grid_recons), out_dir / GRID_NAME, nrow=min(8, len(kept))
    )
    if tokens_path is not None:
        tokens = TokenFile(
            indices=torch.cat(chunks),
            codebook_size=tokenizer.codebook_size,
            model_identity=model.identity,
            sources=kept,
            image_size=image_size,
            protocol=protocol,
            downsample_factor=tokenizer.downsample_factor,
            skipped=skipped,
            model_weights_sha256=model.weights_sha256,
            model_config_sha256=model.config_sha256,
        )
        tokens_path = save_tokens(tokens_path, tokens)
    return ReconstructionReport(
        sources=kept,
        skipped=skipped,
        written=written,
        grid=grid,
        psnr=torch.cat(scores),
        image_size=int(image_size),
        protocol=protocol,
        tokens_path=tokens_path,
    )
