"""Token data for the generator: the token formats, the views of an image, and :class:`TokenDataset`.

**Token store** (format ``"fvq-tokens"`` version 2): a folder written by ``fvq encode DIR --out STORE``::

    STORE/meta.json             what the store holds (below); written last, by rank 0
    STORE/tokens-00000.npy      (N_k, V, h, w), or (N_k, V, h, w, c) with c codes per position: uint16 when the
                                codebook has <= 65,536 codes, int32 up to 2**31, int64 beyond
    STORE/labels-00000.npy      (N_k,) int64: class ids 0 .. C-1, or -1 everywhere when the store has no labels
    STORE/sources-00000.json    the shard's record: the source names of its images, the unreadable files it
                                skipped, the settings it was encoded with, and the size and SHA-256 of its two
                                arrays; written after them, so a shard with a record is complete
    STORE/tokens-00001.npy ...

Shard ``k`` holds the readable images among the input files ``k * shard_size`` to ``(k + 1) * shard_size - 1`` of
the sorted input list, so the shards do not depend on how many processes encoded them. Every file is written through
a temporary name and renamed. ``meta.json`` holds ``format``, ``version``, ``fvq_version``, the tokenizer
(``model_identity``, ``model_weights_sha256``, ``model_config_sha256``, ``codebook_size``, ``grid``,
``codes_per_position``, ``downsample_factor``), the crops (``image_size``, ``protocol``, ``views``, ``view_names``),
the labels (``labels``: ``"subfolders"`` or ``"none"``, ``class_names``), the counts (``num_images``,
``num_inputs``, ``num_skipped``, ``shard_size``, ``inputs_sha256``), ``dtype`` and ``shards``: per shard its input
range, its number of images and the size and SHA-256 of its three files. Readers memory-map the token shards
(``np.load(mmap_mode="r")``), each when it is first read.

**Views** (the ``V`` axis; :class:`ViewSpec`, cut by :class:`ViewCrops`). ``center``: the evaluation crop of the
chosen protocol (one view). ``flip``: that crop and its mirror image. ``tencrop``: LlamaGen's code extraction
(``autoregressive/train/extract_codes_c2i.py``): ADM's centre crop at ``int(1.1 * S)`` (:func:`center_crop_adm`),
then torchvision's ten-crop of ``S x S``: the centre and the four corners, and the same five boxes of the mirrored
crop; ``tencrop+1.05`` adds a second set of ten cut from the centre crop at ``int(1.05 * S)``. Views are stored in
this order for each scale::

    0 center   1 top-left   2 top-right   3 bottom-left   4 bottom-right   5-9 the same boxes of the mirror image

so view 0 is always the plain (un-mirrored) centre crop; torchvision's TenCrop gives
``(tl, tr, bl, br, center, tl', tr', bl', br', center')``, i.e. ours ``[1, 2, 3, 4, 0, 6, 7, 8, 9, 5]``. A mirrored
box is cut from the mirrored image, as torchvision does: the mirrored centre is the mirror of the centre crop only
when ``int(scale * S) - S`` is even (otherwise it lies one pixel to the right).

**Token file** (version 1): one ``.safetensors`` of a few images without views or labels, see
:mod:`fvq.inference.tokens`; :func:`read_token_file` parses it and :class:`TokenDataset` reads it as a store of one
view and no labels.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from fvq.data.images import SharedEpoch
from fvq.data.transforms import EVAL_CROPS, EvalCrop, adm_box_reduce, sample_rng
from fvq.weights import atomic_write_bytes, sha256_file

__all__ = [
    "META_NAME",
    "TOKEN_FILE_VERSION",
    "TOKEN_FORMAT",
    "TOKEN_STORE_VERSION",
    "ForeignTokensError",
    "TokenDataset",
    "TokenSample",
    "TokenStore",
    "ViewCrops",
    "ViewSpec",
    "center_crop_adm",
    "complete_shard",
    "is_token_store",
    "read_token_file",
    "shard_files",
    "storage_dtype",
    "store_files",
    "temporary_files",
    "write_meta",
    "write_shard",
]

TOKEN_FORMAT = "fvq-tokens"
TOKEN_FILE_VERSION = 1
"""Version of the single-file format (one ``.safetensors``)."""
TOKEN_STORE_VERSION = 2
"""Version of the sharded folder format."""
META_NAME = "meta.json"
SHARD_RECORD_FORMAT = "fvq-tokens-shard"
DEFAULT_TENCROP_SCALE = 1.1
BOXES = ("center", "top-left", "top-right", "bottom-left", "bottom-right")
_STORE_FILE = re.compile(r"^(tokens|labels)-\d{5,}\.npy$|^sources-\d{5,}\.json$")
_TEMPORARY_FILE = re.compile(r"^\.((tokens|labels|sources)-\d{5,}|meta)\..*\.tmp$")  # fvq.weights.atomic_path's

VerifyMode = Literal["size", "sha256"]


class ForeignTokensError(ValueError):
    """The tokens were made by another model than the one given to decode or train with them."""


# ---------------------------------------------------------------------------------------------------------------------
# views
@dataclass(frozen=True)
class ViewSpec:
    """Which views of each image a store holds (the ``V`` axis of its token shards); see the module docstring.

    Written ``"center"`` (1 view), ``"flip"`` (2) or ``"tencrop[+SCALE...]"`` (10 per scale). ``"tencrop"`` is the
    scale 1.1; ``"tencrop+1.05"`` adds a set at 1.05 (LlamaGen's ``ten_crop_105``); ``"tencrop@1.2"`` sets the first.

    Attributes:
        kind: ``"center"``, ``"flip"`` or ``"tencrop"``.
        scales: The ten-crop scales (side of the centre crop over the image size), in view order; empty otherwise.
    """

    kind: str
    scales: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("center", "flip", "tencrop"):
            raise ValueError(f"views must be 'center', 'flip' or 'tencrop[+SCALE...]', got kind {self.kind!r}")
        if (self.kind == "tencrop") != bool(self.scales):
            raise ValueError(f"ten-crop views need one scale per set, other views none; got {self.scales}")
        for scale in self.scales:
            if not (math.isfinite(scale) and scale >= 1.0):
                raise ValueError(
                    f"ten-crop scales must be >= 1 (the crop is cut from a larger centre crop), got {scale}"
                )

    @classmethod
    def parse(cls, text: str | ViewSpec) -> ViewSpec:
        """Read ``"center"``, ``"flip"``, ``"tencrop"``, ``"tencrop+1.05"``, ``"tencrop@1.2+1.05"``."""
        if isinstance(text, ViewSpec):
            return text
        parts = [p.strip() for p in str(text).strip().lower().split("+")]
        head, rest = parts[0], parts[1:]
        usage = "views must be 'center', 'flip', 'tencrop', 'tencrop+1.05' or 'tencrop@SCALE[+SCALE...]'"
        if head in ("center", "flip"):
            if rest:
                raise ValueError(f"{usage}; got {text!r} (only ten-crop views take extra scales)")
            return cls(head)
        if head != "tencrop" and not head.startswith("tencrop@"):
            raise ValueError(f"{usage}; got {text!r}")
        items = [head.removeprefix("tencrop@") if head != "tencrop" else str(DEFAULT_TENCROP_SCALE)]
        items += [p.removeprefix("tencrop@") for p in rest]
        try:
            scales = tuple(float(s) for s in items)
        except ValueError:
            raise ValueError(f"{usage}; got {text!r}") from None
        if len(set(scales)) != len(scales):
            raise ValueError(f"ten-crop scales must differ, got {text!r}")
        return cls("tencrop", scales)

    def __str__(self) -> str:
        if self.kind != "tencrop":
            return self.kind
        first = "tencrop" if self.scales[0] == DEFAULT_TENCROP_SCALE else f"tencrop@{self.scales[0]:g}"
        return "+".join([first, *(f"{s:g}" for s in self.scales[1:])])

    @property
    def count(self) -> int:
        """Number of views ``V``."""
        return {"center": 1, "flip": 2}.get(self.kind, 10 * len(self.scales))

    @property
    def names(self) -> list[str]:
        """One name per view, in store order (``"center"``, ``"center-flip"``, ``"1.1/top-left-flip"``, ...)."""
        if self.kind == "center":
            return ["center"]
        if self.kind == "flip":
            return ["center", "center-flip"]
        return [f"{s:g}/{box}{suffix}" for s in self.scales for suffix in ("", "-flip") for box in BOXES]

    def crop_size(self, image_size: int, scale: float) -> int:
        """Side of the ADM centre crop a ten-crop set is cut from: ``int(image_size * scale)``, as LlamaGen."""
        return int(image_size * scale)


def center_crop_adm(image: Image.Image, size: int) -> Image.Image:
    """ADM's ``center_crop_arr`` (guided-diffusion, used by LlamaGen to extract codes): halve with BOX while the short
    side is >= ``2 * size``, resize with BICUBIC by ``size / short side`` (each side ``round(side * scale)``), then the
    centre ``size x size`` crop at ``((H - size) // 2, (W - size) // 2)``.

    Args:
        image: RGB PIL image.
        size: Side of the square crop.
    """
    image = adm_box_reduce(image, size)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    top, left = (image.height - size) // 2, (image.width - size) // 2
    return image.crop((left, top, left + size, top + size))


def ten_crop_boxes(side: int, size: int) -> list[tuple[int, int, int, int]]:
    """PIL boxes ``(left, top, right, bottom)`` of the five ``size x size`` crops of a ``side x side`` image, in store
    order (centre, top-left, top-right, bottom-left, bottom-right). The centre is torchvision's
    (``int(round((side - size) / 2))``, Python rounds halves to even)."""
    if side < size:
        raise ValueError(f"cannot cut {size}x{size} crops from a {side}x{side} image")
    c, far = int(round((side - size) / 2.0)), side - size
    return [(left, top, left + size, top + size) for top, left in ((c, c), (0, 0), (0, far), (far, 0), (far, far))]


class ViewCrops:
    """Cut the views of an image, in store order: ``ViewCrops(spec, S, protocol)(image) -> [V images S x S]``.

    Args:
        spec: The views (:class:`ViewSpec` or its text).
        image_size: Side ``S`` of every view.
        protocol: Evaluation crop of the ``center`` and ``flip`` views (:class:`~fvq.data.transforms.EvalCrop`); the
            ten-crop views always start from ADM's centre crop.
    """

    def __init__(self, spec: ViewSpec | str, image_size: int, protocol: str = "llamagen") -> None:
        self.spec = ViewSpec.parse(spec)
        if protocol not in EVAL_CROPS:
            raise ValueError(f"protocol must be one of {tuple(EVAL_CROPS)}, got {protocol!r}")
        self.image_size = int(image_size)
        self.protocol = protocol
        self.eval_crop = EvalCrop(self.image_size, protocol)  # type: ignore[arg-type]

    def __call__(self, image: Image.Image) -> list[Image.Image]:
        if self.spec.kind != "tencrop":
            crop = self.eval_crop(image)
            return [crop] if self.spec.kind == "center" else [crop, crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
        views: list[Image.Image] = []
        for scale in self.spec.scales:
            side = self.spec.crop_size(self.image_size, scale)
            large = center_crop_adm(image, side)
            boxes = ten_crop_boxes(side, self.image_size)
            for source in (large, large.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
                views.extend(source.crop(box) for box in boxes)
        return views

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.spec)!r}, image_size={self.image_size}, protocol={self.protocol!r})"


# ---------------------------------------------------------------------------------------------------------------------
# writing a store
def storage_dtype(codebook_size: int) -> np.dtype:
    """The smallest integer type of a store's token shards: uint16 up to 65,536 codes, int32 up to 2**31, int64."""
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    if codebook_size <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32) if codebook_size <= 2**31 else np.dtype(np.int64)


def shard_files(index: int) -> tuple[str, str, str]:
    """File names of shard ``index``: ``(tokens-k.npy, labels-k.npy, sources-k.json)``."""
    return f"tokens-{index:05d}.npy", f"labels-{index:05d}.npy", f"sources-{index:05d}.json"


def store_files(directory: str | os.PathLike) -> list[Path]:
    """The files of a store in ``directory``: ``meta.json``, the shard files and leftover temporary files."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if p.name == META_NAME or _STORE_FILE.match(p.name) or _TEMPORARY_FILE.match(p.name)
    )


def temporary_files(directory: str | os.PathLike) -> list[Path]:
    """Temporary files an interrupted writer left in a store folder."""
    return [p for p in store_files(directory) if _TEMPORARY_FILE.match(p.name)]


def is_token_store(path: str | os.PathLike) -> bool:
    """True for a folder holding a token store's ``meta.json``."""
    return (Path(path) / META_NAME).is_file()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode()


def _entry(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_shard(
    directory: str | os.PathLike,
    index: int,
    *,
    tokens: np.ndarray,
    labels: np.ndarray,
    sources: Sequence[str],
    skipped: Sequence[str],
    first_input: int,
    inputs: int,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Write shard ``index`` atomically: its tokens, its labels, then its record (which marks it complete).

    Args:
        directory: The store folder.
        index: Shard number.
        tokens: ``(N_k, V, h, w[, c])`` ids, already in :func:`storage_dtype` of the codebook.
        labels: ``(N_k,)`` class ids (-1 without labels).
        sources: ``N_k`` source names, one per image.
        skipped: Unreadable input files of the shard's range.
        first_input: Position of the shard's first input file in the sorted input list.
        inputs: Input files in the shard's range (readable or not).
        settings: What the store is encoded with (the same for every shard; compared on resume).

    Returns:
        The shard's entry of ``meta.json`` (input range, images, size and SHA-256 of its three files).
    """
    if tokens.shape[0] != len(sources) or labels.shape != (len(sources),):
        raise ValueError(
            f"shard {index}: {tokens.shape[0]} token rows, labels {labels.shape} and {len(sources)} source names"
        )
    directory = Path(directory)
    tokens_name, labels_name, record_name = shard_files(index)
    files: dict[str, Any] = {}
    for name, array in ((tokens_name, tokens), (labels_name, labels.astype(np.int64, copy=False))):
        data = _npy_bytes(array)
        atomic_write_bytes(directory / name, data)
        files[name] = _entry(data)
    record = {
        "format": SHARD_RECORD_FORMAT,
        "version": TOKEN_STORE_VERSION,
        "index": int(index),
        "first_input": int(first_input),
        "inputs": int(inputs),
        "images": len(sources),
        "files": files,
        "settings": dict(settings),
        "sources": list(sources),
        "skipped": list(skipped),
    }
    data = _json_bytes(record)
    atomic_write_bytes(directory / record_name, data)
    return _meta_entry(record, _entry(data), record_name)


def _meta_entry(record: Mapping[str, Any], record_entry: Mapping[str, Any], record_name: str) -> dict[str, Any]:
    return {
        "index": record["index"],
        "first_input": record["first_input"],
        "inputs": record["inputs"],
        "images": record["images"],
        "files": {**record["files"], record_name: dict(record_entry)},
    }


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != SHARD_RECORD_FORMAT:
        return None
    return record


def _settings_difference(found: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))


def complete_shard(
    directory: str | os.PathLike, index: int, settings: Mapping[str, Any], *, check_sha256: bool = True
) -> dict[str, Any] | None:
    """The ``meta.json`` entry of shard ``index`` when it is complete and intact, else ``None`` (encode it again).

    Complete: its record exists and parses; intact: both arrays have the size and (``check_sha256``) the SHA-256
    the record gives.

    Raises:
        ValueError: The shard was encoded with other settings (another model, other views, other inputs...).
    """
    directory = Path(directory)
    _, _, record_name = shard_files(index)
    record = _read_record(directory / record_name)
    if record is None or record.get("index") != index:
        return None
    differ = _settings_difference(record.get("settings") or {}, settings)
    if differ:
        found, wanted = record.get("settings") or {}, settings
        shown = "; ".join(f"{k}: {found.get(k)!r} there, {wanted.get(k)!r} now" for k in differ[:4])
        raise ValueError(
            f"{directory} holds shards encoded with other settings ({shown}); pass --overwrite to start again, or "
            f"write to another folder"
        )
    for name, entry in (record.get("files") or {}).items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return None
        if check_sha256 and sha256_file(path) != entry.get("sha256"):
            return None
    data = (directory / record_name).read_bytes()
    return _meta_entry(record, _entry(data), record_name)


def write_meta(
    directory: str | os.PathLike, settings: Mapping[str, Any], shards: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Write ``meta.json`` (atomically) from the settings and every shard's entry, in shard order; returns it."""
    from fvq.version import __version__

    shards = sorted(shards, key=lambda s: s["index"])
    if [s["index"] for s in shards] != list(range(len(shards))):
        raise ValueError(f"shards must be numbered 0 .. {len(shards) - 1}, got {[s['index'] for s in shards]}")
    meta = {
        "format": TOKEN_FORMAT,
        "version": TOKEN_STORE_VERSION,
        "fvq_version": __version__,
        **settings,
        "view_names": ViewSpec.parse(settings["views"]).names,
        "num_images": sum(int(s["images"]) for s in shards),
        "num_skipped": sum(int(s["inputs"]) - int(s["images"]) for s in shards),
        "shards": list(shards),
    }
    atomic_write_bytes(Path(directory) / META_NAME, _json_bytes(meta))
    return meta


# ---------------------------------------------------------------------------------------------------------------------
# reading
def _meta_int(metadata: Mapping[str, str], key: str, path: Path) -> int:
    try:
        return int(metadata[key])
    except KeyError:
        raise ValueError(f"token file {path} lacks the metadata entry {key!r}") from None
    except ValueError:
        raise ValueError(f"token file {path}: metadata {key}={metadata[key]!r} is not an integer") from None


def read_token_file(path: str | os.PathLike) -> tuple[Tensor, dict[str, str]]:
    """Read a version-1 token file: its ``indices`` as stored and its metadata, after checking the format tag, the
    version and that the shape matches the metadata.

    Returns:
        ``(indices, metadata)``: ``indices`` ``(N, h, w)`` or ``(N, h, w, c)`` (int32 or int64).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder: read token stores with fvq.data.tokens.TokenStore")
    if not path.is_file():
        raise FileNotFoundError(f"token file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
            indices = f.get_tensor("indices") if "indices" in keys else None
    except SafetensorError as error:
        raise ValueError(f"{path} is not a safetensors file: {error}") from error
    if metadata.get("format") != TOKEN_FORMAT:
        raise ValueError(
            f"{path} is not an fvq token file (metadata format={metadata.get('format')!r}, expected "
            f"{TOKEN_FORMAT!r}); write token files with `fvq encode` or fvq.inference.save_tokens"
        )
    version = _meta_int(metadata, "format_version", path)
    if version != TOKEN_FILE_VERSION:
        raise ValueError(
            f"{path} has token format_version {version}; single token files are version {TOKEN_FILE_VERSION} "
            f"(version {TOKEN_STORE_VERSION} is a folder)"
        )
    if indices is None:
        raise ValueError(f"token file {path} has no 'indices' tensor (it has {keys})")
    expected = [_meta_int(metadata, k, path) for k in ("num_images", "grid_height", "grid_width")]
    codes = _meta_int(metadata, "codes_per_position", path)
    if _meta_int(metadata, "codebook_size", path) < 1:
        raise ValueError(f"token file {path}: codebook_size must be >= 1, got {metadata['codebook_size']}")
    if codes > 1:
        expected.append(codes)
    if list(indices.shape) != expected:
        raise ValueError(
            f"token file {path}: indices have shape {tuple(indices.shape)} but the metadata says {tuple(expected)} "
            f"(num_images, grid_height, grid_width{', codes_per_position' if codes > 1 else ''})"
        )
    return indices, metadata


def _store_meta_from_file(path: Path, indices: Tensor, metadata: Mapping[str, str]) -> dict[str, Any]:
    """The ``meta.json`` a version-1 file would have as a store of one view and no labels."""
    n = int(indices.shape[0])
    optional = {k: metadata.get(k) for k in ("model_weights_sha256", "model_config_sha256", "protocol")}
    return {
        "format": TOKEN_FORMAT,
        "version": TOKEN_FILE_VERSION,
        "fvq_version": metadata.get("fvq_version"),
        "model_identity": metadata.get("model_identity", ""),
        **optional,
        "codebook_size": _meta_int(metadata, "codebook_size", path),
        "grid": [int(indices.shape[1]), int(indices.shape[2])],
        "codes_per_position": _meta_int(metadata, "codes_per_position", path),
        "downsample_factor": int(metadata["downsample_factor"]) if "downsample_factor" in metadata else None,
        "image_size": int(metadata["image_size"]) if "image_size" in metadata else None,
        "views": "center",
        "view_names": ["center"],
        "labels": "none",
        "class_names": [],
        "num_images": n,
        "num_skipped": len(json.loads(metadata.get("skipped", "[]"))),
        "shards": [{"index": 0, "first_input": 0, "inputs": n, "images": n, "files": {}}],
    }


_REQUIRED_META = (
    "model_identity",
    "codebook_size",
    "grid",
    "codes_per_position",
    "views",
    "class_names",
    "num_images",
    "shards",
)


class TokenStore:
    """A token store opened for reading (a version-2 folder, or a version-1 file read as one shard of one view).

    Opening reads ``meta.json`` and checks that every shard's files exist with the recorded sizes (``verify="size"``,
    cheap) or also with the recorded SHA-256 (``verify="sha256"``, reads everything once); the label shards are read
    (``N`` int64) and checked against the classes. Token shards are memory-mapped when first read.

    Args:
        path: The store folder (or a version-1 ``.safetensors`` file).
        verify: ``"size"`` or ``"sha256"``.

    Attributes:
        path: As given. meta: The ``meta.json`` content. labels: ``(N,)`` int64 class ids (-1 without labels).
    """

    def __init__(self, path: str | os.PathLike, *, verify: VerifyMode = "size") -> None:
        if verify not in ("size", "sha256"):
            raise ValueError(f"verify must be 'size' or 'sha256', got {verify!r}")
        self.path = Path(path)
        self._arrays: dict[int, np.ndarray] = {}
        self._sources: dict[int, list[str]] = {}
        if self.path.is_file():
            indices, metadata = read_token_file(self.path)
            self.meta = _store_meta_from_file(self.path, indices, metadata)
            tokens = indices.numpy().astype(np.int64)[:, None]  # (N, 1, h, w[, c])
            self._arrays[0] = tokens
            sources = json.loads(metadata.get("sources", "[]"))
            self._sources[0] = sources if len(sources) == tokens.shape[0] else []
            self._skipped = list(json.loads(metadata.get("skipped", "[]")))
            self.labels = np.full(tokens.shape[0], -1, dtype=np.int64)
            self._ends = [tokens.shape[0]]
            self._check_labels()
            return
        self.meta = self._read_meta()
        self._ends = list(np.cumsum([int(s["images"]) for s in self.shards]).tolist())
        if (self._ends[-1] if self._ends else 0) != self.num_images:
            raise ValueError(
                f"{self.path / META_NAME}: the shards hold {self._ends[-1] if self._ends else 0} images but "
                f"num_images is {self.num_images}"
            )
        for shard in self.shards:
            self._check_files(shard, verify)
        self.labels = self._read_labels()
        self._check_labels()

    # -- meta ----------------------------------------------------------------------------------------------------------
    def _read_meta(self) -> dict[str, Any]:
        meta_path = self.path / META_NAME
        if not self.path.exists():
            raise FileNotFoundError(f"token store {self.path} not found")
        if not meta_path.is_file():
            hint = (
                "; its shards are there: the encoding was interrupted, finish it with `fvq encode ... --resume`"
                if any(self.path.glob("sources-*.json"))
                else ""
            )
            raise FileNotFoundError(f"{self.path} is not a token store: it has no {META_NAME}{hint}")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as error:
            raise ValueError(f"{meta_path} is not valid JSON ({error}): the store is damaged") from error
        if not isinstance(meta, dict) or meta.get("format") != TOKEN_FORMAT:
            raise ValueError(f"{meta_path} is not an fvq token store (format={meta.get('format')!r})")
        version = meta.get("version")
        if version != TOKEN_STORE_VERSION:
            raise ValueError(
                f"{self.path} is a token store of format version {version}; this fvq reads version "
                f"{TOKEN_STORE_VERSION} stores (and version {TOKEN_FILE_VERSION} files)"
            )
        missing = [k for k in _REQUIRED_META if k not in meta]
        if missing:
            raise ValueError(f"{meta_path} lacks {missing}: the store is damaged or was not written by fvq encode")
        return meta

    def _check_files(self, shard: Mapping[str, Any], verify: VerifyMode) -> None:
        for name, entry in shard["files"].items():
            path = self.path / name
            if not path.is_file():
                raise FileNotFoundError(
                    f"token store {self.path}: shard {shard['index']} file {name} is missing; copy the whole store, or "
                    f"encode it again with `fvq encode ... --resume`"
                )
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise ValueError(
                    f"token store {self.path}: shard file {name} has {size} bytes, meta.json records {entry['bytes']}: "
                    f"it is damaged or incomplete; encode it again with `fvq encode ... --resume`"
                )
            if verify == "sha256" and sha256_file(path) != entry["sha256"]:
                raise ValueError(
                    f"token store {self.path}: shard file {name} does not match its SHA-256 in meta.json: it is "
                    f"damaged; encode it again with `fvq encode ... --resume`"
                )

    def _read_labels(self) -> np.ndarray:
        parts = []
        for shard in self.shards:
            _, labels_name, _ = shard_files(int(shard["index"]))
            labels = np.load(self.path / labels_name, mmap_mode="r", allow_pickle=False)
            if labels.shape != (int(shard["images"]),) or labels.dtype != np.int64:
                raise ValueError(
                    f"token store {self.path}: {labels_name} holds {labels.dtype} {labels.shape}, expected int64 "
                    f"({shard['images']},)"
                )
            parts.append(np.array(labels))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _check_labels(self) -> None:
        classes = self.num_classes
        low, high = (0, classes - 1) if classes else (-1, -1)
        bad = np.flatnonzero((self.labels < low) | (self.labels > high))
        if bad.size:
            shard, row = self.locate(int(bad[0]))
            what = f"class ids in [0, {classes - 1}] ({classes} classes)" if classes else "-1 (the store has no labels)"
            raise ValueError(
                f"token store {self.path}: labels must be {what}; {bad.size} are not, the first "
                f"{int(self.labels[bad[0]])} at image {int(bad[0])} ({shard_files(shard)[1]} row {row})"
            )

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.meta["shards"])

    @property
    def version(self) -> int:
        return int(self.meta["version"])

    @property
    def num_images(self) -> int:
        return int(self.meta["num_images"])

    @property
    def model_identity(self) -> str:
        return str(self.meta["model_identity"])

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.meta["grid"]
        return int(h), int(w)

    @property
    def codes_per_position(self) -> int:
        return int(self.meta["codes_per_position"])

    @property
    def views(self) -> int:
        return len(self.meta["view_names"])

    @property
    def view_names(self) -> list[str]:
        return list(self.meta["view_names"])

    @property
    def class_names(self) -> list[str]:
        return [str(n) for n in self.meta["class_names"]]

    @property
    def num_classes(self) -> int:
        return len(self.meta["class_names"])

    # -- shards --------------------------------------------------------------------------------------------------------
    def locate(self, index: int) -> tuple[int, int]:
        """``(shard, row)`` of image ``index``."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} out of range for a token store of {self.num_images} images")
        shard = bisect.bisect_right(self._ends, index)
        return shard, index - (self._ends[shard - 1] if shard else 0)

    def tokens(self, shard: int) -> np.ndarray:
        """Shard ``shard``'s token array ``(N_k, V, h, w[, c])``, memory-mapped (opened on first use)."""
        array = self._arrays.get(shard)
        if array is None:
            name = shard_files(shard)[0]
            try:
                array = np.load(self.path / name, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as error:
                raise ValueError(f"token store {self.path}: cannot read shard {name}: {error}") from error
            h, w = self.grid
            expected = (int(self.meta["shards"][shard]["images"]), self.views, h, w)
            expected += (self.codes_per_position,) if self.codes_per_position > 1 else ()
            dtype = np.dtype(self.meta.get("dtype", storage_dtype(self.codebook_size).name))
            if array.shape != expected or array.dtype != dtype:
                raise ValueError(
                    f"token store {self.path}: shard {name} holds {array.dtype} {array.shape}, meta.json describes "
                    f"{dtype} {expected} (images, views, grid height, grid width[, codes])"
                )
            self._arrays[shard] = array
        return array

    @property
    def open_shards(self) -> list[int]:
        """The token shards opened so far in this process."""
        return sorted(self._arrays)

    def sources(self, shard: int) -> list[str]:
        """Source names of shard ``shard``'s images (from its record)."""
        if shard not in self._sources:
            self._sources[shard] = list(self._record(shard).get("sources", []))
        return self._sources[shard]

    def skipped(self) -> list[str]:
        """The unreadable input files, over all shards."""
        if self.version == TOKEN_FILE_VERSION:
            return list(self._skipped)
        return [name for s in range(len(self.shards)) for name in self._record(s).get("skipped", [])]

    def _record(self, shard: int) -> dict[str, Any]:
        name = shard_files(shard)[2]
        record = _read_record(self.path / name)
        if record is None:
            raise ValueError(f"token store {self.path}: shard record {name} is missing or damaged")
        return record

    def check_ids(self, ids: np.ndarray, index: int) -> None:
        """Raise unless every id of image ``index`` lies in ``[0, codebook_size)``."""
        if ids.size and (int(ids.max()) >= self.codebook_size or int(ids.min()) < 0):
            shard, row = self.locate(index)
            names = self.sources(shard)
            where = f"{shard_files(shard)[0]} row {row}" + (f" ({names[row]})" if row < len(names) else "")
            raise ValueError(
                f"token store {self.path}: ids must lie in [0, {self.codebook_size - 1}] (codebook_size "
                f"{self.codebook_size}); image {index} holds ids in [{int(ids.min())}, {int(ids.max())}] ({where})"
            )

    def __getstate__(self) -> dict[str, Any]:
        # memory maps would be pickled as copies of their data: reopen them in the process that unpickles
        state = dict(self.__dict__)
        if self.version != TOKEN_FILE_VERSION:
            state["_arrays"] = {}
        return state

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({os.fspath(self.path)!r}, images={self.num_images}, views={self.views}, "
            f"grid={self.grid}, codebook_size={self.codebook_size}, classes={self.num_classes})"
        )


class TokenSample(NamedTuple):
    """One item of a :class:`TokenDataset`; batches collate to the same type with a leading batch axis.

    Attributes:
        tokens: int64 ``(T,)`` ids in raster order, ``T = h * w`` (``(T, c)`` with ``c`` codes per position).
        label: int64 ``()`` class id (-1 when the store has no labels).
    """

    tokens: Tensor
    label: Tensor


class TokenDataset(Dataset):
    """The token sequences of a store, one image per item, for training the generator (map-style).

    For ``split="train"`` each item is one of the image's views, drawn per epoch as a pure function of
    ``(seed, epoch, index)`` (:func:`~fvq.data.transforms.sample_rng`), so any number of workers or ranks, and a
    resumed run, read the same views; other splits always read view 0, the plain centre crop. Token shards are
    memory-mapped, opened when first read. :func:`~fvq.data.build.build_loader` calls :meth:`set_epoch`.

    Args:
        path: A token store folder (version 2), or a version-1 ``.safetensors`` file (one view, no labels).
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: Seed of the view draws.
        verify: ``"size"`` (every shard file present with its recorded size) or ``"sha256"`` (also its digest).
        require_labels: Refuse a store without class labels (a class-conditional model needs them).

    Attributes:
        grid: Token grid ``(h, w)``. codebook_size: Ids lie in ``[0, codebook_size)``. num_classes: Classes (0 without
        labels). class_names: One name per class (sorted subfolder names). model_identity: The tokenizer's
        :func:`~fvq.inference.loading.model_identity`. codes_per_position: Codes per grid position. views: Views per
        image. view_names: Their names. store: The :class:`TokenStore`.

    Raises:
        FileNotFoundError: The store, its ``meta.json`` or a shard file is missing.
        ValueError: Wrong format or version, damaged shard (the message names it), labels out of range, or
            ``require_labels`` and the store has none.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        split: str = "train",
        seed: int = 0,
        verify: VerifyMode = "size",
        require_labels: bool = False,
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.store = TokenStore(path, verify=verify)
        self.split = split
        self.seed = int(seed)
        self.grid = self.store.grid
        self.codebook_size = self.store.codebook_size
        self.num_classes = self.store.num_classes
        self.class_names = self.store.class_names
        self.model_identity = self.store.model_identity
        self.codes_per_position = self.store.codes_per_position
        self.views = self.store.views
        self.view_names = self.store.view_names
        if require_labels and self.num_classes == 0:
            raise ValueError(
                f"token store {self.store.path} has no class labels, which a class-conditional model needs; encode "
                f"an ImageNet-style folder (one subfolder per class) with `fvq encode DIR --labels subfolders`"
            )
        self._labels = torch.from_numpy(self.store.labels)  # (N,) int64
        self._epoch = SharedEpoch()

    def __len__(self) -> int:
        return self.store.num_images

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the view draws (seen by DataLoader workers, persistent ones included)."""
        self._epoch.set(epoch)

    def view_of(self, index: int) -> int:
        """The view read for image ``index`` in the current epoch: drawn uniformly from ``sample_rng(seed, epoch,
        index)`` for the training split (when there are several), else 0."""
        if self.split != "train" or self.views == 1:
            return 0
        return int(sample_rng(self.seed, self.epoch, index).integers(self.views))

    def __getitem__(self, index: int) -> TokenSample:
        index = int(index)
        shard, row = self.store.locate(index)
        ids = np.asarray(self.store.tokens(shard)[row, self.view_of(index)]).astype(np.int64)  # (h, w[, c])
        self.store.check_ids(ids, index)
        tokens = torch.from_numpy(ids.reshape(self.grid[0] * self.grid[1], *ids.shape[2:]))  # (T[, c])
        return TokenSample(tokens=tokens, label=self._labels[index].clone())  # a copy: workers send it alone

    def check_model_identity(self, identity: str) -> None:
        """Raise :class:`ForeignTokensError` unless the tokens were made by the model of identity ``identity``."""
        if identity != self.model_identity:
            raise ForeignTokensError(
                f"the tokens of {self.store.path} were made by model {self.model_identity or '(unknown)'} but the model"
                f" given is {identity}; tokens of one tokenizer are meaningless to another: use the tokenizer that "
                f"encoded them, or encode the images again"
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({os.fspath(self.store.path)!r}, split={self.split!r}, images={len(self)}, "
            f"views={self.views}, grid={self.grid}, codebook_size={self.codebook_size}, classes={self.num_classes})"
        )
