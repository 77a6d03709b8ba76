"""The token file: token ids of a set of images, with what is needed to decode them safely.

Token file (``.safetensors``, written atomically)::

    indices   int32 (int64 when the codebook has >= 2**31 codes), shape (N, h, w), or (N, h, w, c) when
              several codes describe one position (residual, grouped quantizers)

    metadata (strings): format="fvq-tokens", format_version="1", fvq_version, num_images, grid_height, grid_width,
              codes_per_position, codebook_size, downsample_factor, image_size, protocol, model_identity
              (see :func:`~fvq.inference.loading.model_identity`), model_weights_sha256 and model_config_sha256 (the
              two full digests), sources (JSON list of file names relative to the folder given, one per image),
              skipped (JSON list of unreadable files)

In memory (:class:`TokenFile`) indices are int64, the dtype every fvq quantizer takes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fvq.inference.loading import LoadedModel
from fvq.models.tokenizer import Tokenizer
from fvq.weights import atomic_write_bytes

__all__ = [
    "TOKEN_FORMAT",
    "TOKEN_FORMAT_VERSION",
    "ForeignTokensError",
    "TokenFile",
    "check_tokens",
    "load_tokens",
    "save_tokens",
]

TOKEN_FORMAT = "fvq-tokens"
TOKEN_FORMAT_VERSION = 1
_INT32_MAX = 2**31 - 1


class ForeignTokensError(ValueError):
    """The tokens were made by another model than the one given to decode them."""


@dataclass
class TokenFile:
    """Token ids of a set of images, with what is needed to decode them safely.

    Attributes:
        indices: int64 ``(N, h, w)``, or ``(N, h, w, c)`` for quantizers with ``c`` codes per position.
        codebook_size: Distinct ids at one code position (ids lie in ``[0, codebook_size)``).
        model_identity: :func:`~fvq.inference.loading.model_identity` of the model that made them.
        sources: One name per image (the file's path relative to the folder given, or its file name); may be empty.
        image_size: Side of the square crops that were encoded.
        protocol: Crop protocol used (``"llamagen"`` or ``"fvq"``).
        downsample_factor: Image pixels per token along each side.
        skipped: Input files that could not be decoded and were left out.
        model_weights_sha256: :func:`~fvq.inference.loading.weights_digest` of the model's weights (full).
        model_config_sha256: :func:`~fvq.inference.loading.config_digest` of the model's config (full).
        fvq_version: Version of fvq that wrote the tokens.
    """

    indices: Tensor
    codebook_size: int
    model_identity: str
    sources: list[str] = field(default_factory=list)
    image_size: int | None = None
    protocol: str | None = None
    downsample_factor: int | None = None
    skipped: list[str] = field(default_factory=list)
    model_weights_sha256: str | None = None
    model_config_sha256: str | None = None
    fvq_version: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.indices, Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(self.indices).__name__}")
        if self.indices.is_floating_point() or self.indices.is_complex() or self.indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got dtype {self.indices.dtype}")
        if self.indices.ndim not in (3, 4):
            raise ValueError(f"indices must have shape (N, h, w) or (N, h, w, c), got {tuple(self.indices.shape)}")
        self.indices = self.indices.to(torch.int64)
        if int(self.codebook_size) < 1:
            raise ValueError(f"codebook_size must be >= 1, got {self.codebook_size}")
        self.codebook_size = int(self.codebook_size)
        self.sources = [str(s) for s in self.sources]
        self.skipped = [str(s) for s in self.skipped]
        if self.sources and len(self.sources) != self.num_images:
            raise ValueError(f"{len(self.sources)} source names for {self.num_images} images; give one per image")

    @property
    def num_images(self) -> int:
        return int(self.indices.shape[0])

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Token grid ``(h, w)`` of each image."""
        return int(self.indices.shape[1]), int(self.indices.shape[2])

    @property
    def codes_per_position(self) -> int:
        return 1 if self.indices.ndim == 3 else int(self.indices.shape[3])

    @property
    def storage_dtype(self) -> torch.dtype:
        """int32 unless the codebook holds 2**31 codes or more."""
        return torch.int32 if self.codebook_size - 1 <= _INT32_MAX else torch.int64


def save_tokens(path: str | os.PathLike, tokens: TokenFile) -> Path:
    """Write a :class:`TokenFile` as safetensors (format in the module docstring), atomically.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from safetensors.torch import save as safetensors_save

    from fvq.version import __version__

    if not isinstance(tokens, TokenFile):
        raise TypeError(f"tokens must be a TokenFile, got {type(tokens).__name__}")
    path = Path(path)
    h, w = tokens.grid_shape
    metadata = {
        "format": TOKEN_FORMAT,
        "format_version": str(TOKEN_FORMAT_VERSION),
        "fvq_version": tokens.fvq_version or __version__,
        "num_images": str(tokens.num_images),
        "grid_height": str(h),
        "grid_width": str(w),
        "codes_per_position": str(tokens.codes_per_position),
        "codebook_size": str(tokens.codebook_size),
        "model_identity": tokens.model_identity,
        "sources": json.dumps(tokens.sources),
        "skipped": json.dumps(tokens.skipped),
    }
    optional = {
        "downsample_factor": tokens.downsample_factor,
        "image_size": tokens.image_size,
        "protocol": tokens.protocol,
        "model_weights_sha256": tokens.model_weights_sha256,
        "model_config_sha256": tokens.model_config_sha256,
    }
    metadata.update({k: str(v) for k, v in optional.items() if v is not None})
    indices = tokens.indices.detach().to("cpu").to(tokens.storage_dtype).contiguous()
    atomic_write_bytes(path, safetensors_save({"indices": indices}, metadata=metadata))
    return path


def _meta_int(metadata: Mapping[str, str], key: str, path: Path) -> int:
    try:
        return int(metadata[key])
    except KeyError:
        raise ValueError(f"token file {path} lacks the metadata entry {key!r}") from None
    except ValueError:
        raise ValueError(f"token file {path}: metadata {key}={metadata[key]!r} is not an integer") from None


def load_tokens(path: str | os.PathLike) -> TokenFile:
    """Read a token file written by :func:`save_tokens` (checks its format and that shapes match its metadata)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
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
    if version > TOKEN_FORMAT_VERSION:
        raise ValueError(f"{path} has token format_version {version}; this fvq reads <= {TOKEN_FORMAT_VERSION}")
    if indices is None:
        raise ValueError(f"token file {path} has no 'indices' tensor (it has {keys})")
    expected = [_meta_int(metadata, k, path) for k in ("num_images", "grid_height", "grid_width")]
    codes = _meta_int(metadata, "codes_per_position", path)
    if codes > 1:
        expected.append(codes)
    if list(indices.shape) != expected:
        raise ValueError(
            f"token file {path}: indices have shape {tuple(indices.shape)} but the metadata says {tuple(expected)} "
            f"(num_images, grid_height, grid_width{', codes_per_position' if codes > 1 else ''})"
        )

    def optional_int(key: str) -> int | None:
        return _meta_int(metadata, key, path) if key in metadata else None

    return TokenFile(
        indices=indices,
        codebook_size=_meta_int(metadata, "codebook_size", path),
        model_identity=metadata.get("model_identity", ""),
        sources=json.loads(metadata.get("sources", "[]")),
        image_size=optional_int("image_size"),
        protocol=metadata.get("protocol"),
        downsample_factor=optional_int("downsample_factor"),
        skipped=json.loads(metadata.get("skipped", "[]")),
        model_weights_sha256=metadata.get("model_weights_sha256"),
        model_config_sha256=metadata.get("model_config_sha256"),
        fvq_version=metadata.get("fvq_version"),
    )


def check_tokens(model: Tokenizer | LoadedModel, tokens: TokenFile, *, force: bool = False) -> None:
    """Refuse tokens this model cannot decode correctly.

    Args:
        model: The model that will decode (a :class:`Tokenizer` or a :class:`LoadedModel`).
        tokens: The token file.
        force: Decode tokens made by another model anyway (ids are still range-checked).

    Raises:
        ForeignTokensError: Another model made the tokens (unless ``force``).
        ValueError: The number of codes per position differs, or ids lie outside ``[0, codebook_size)`` (the message
            names the offending range and the first image).
    """
    loaded = LoadedModel.of(model)
    tokenizer = loaded.tokenizer
    if not force and tokens.model_identity != loaded.identity:
        raise ForeignTokensError(
            f"these tokens were made by model {tokens.model_identity or '(unknown)'} but the model given is "
            f"{loaded.identity}; another model's tokens decode to garbage. Use the model that encoded them, or pass "
            f"force=True to decode anyway"
        )
    codes = int(getattr(tokenizer.quantizer, "codes_per_position", 1))
    if tokens.codes_per_position != codes:
        raise ValueError(
            f"the tokens have {tokens.codes_per_position} code(s) per position (indices {tuple(tokens.indices.shape)})"
            f" but the model uses {codes}"
        )
    size = tokenizer.codebook_size
    indices = tokens.indices
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= size:
        bad = (indices < 0) | (indices >= size)
        first = int(bad.flatten(1).any(dim=1).nonzero()[0])
        where = f"image {first}" + (f" ({tokens.sources[first]})" if tokens.sources else "")
        raise ValueError(
            f"token ids must lie in [0, {size - 1}] for this model (codebook_size {size}); the file holds ids in "
            f"[{low}, {high}]: {int(bad.sum())} out of range, first in {where}"
        )
