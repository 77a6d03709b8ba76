"""Token files and stores: token ids of a set of images, with what is needed to decode them safely.

Two formats, both tagged ``format="fvq-tokens"``:

* version 1, the token file (one ``.safetensors``): a few images, one crop each, no labels. :func:`save_tokens`
  writes it, :func:`load_tokens` reads it as a :class:`TokenFile`.
* version 2, the token store (a folder of memory-mappable shards, with views and class labels): written by
  :func:`~fvq.inference.pipeline.encode_store` (``fvq encode DIR --out STORE``), read by
  :class:`fvq.data.tokens.TokenDataset` for training; its layout is described in :mod:`fvq.data.tokens`.
  :func:`load_tokens` reads one view of it (view 0, the plain centre crop, by default) as a :class:`TokenFile`.

Token file (``.safetensors``, written atomically)::

    indices   int32 (int64 when the codebook has >= 2**31 codes), shape (N, h, w), or (N, h, w, c) when
              several codes describe one position (residual, grouped quantizers)

    metadata (strings): format="fvq-tokens", format_version="1", fvq_version, num_images, grid_height, grid_width,
              codes_per_position, codebook_size, downsample_factor, image_size, protocol, model_identity
              (see :func:`~fvq.inference.loading.model_identity`), model_weights_sha256 and model_config_sha256 (the
              two full digests), sources (JSON list of file names relative to the folder given, one per image),
              skipped (JSON list of unreadable files)

In memory (:class:`TokenFile`) indices are int64, the dtype every fvq quantizer takes. :func:`check_tokens` refuses
tokens (of a file or a store) that another model made.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fvq.data.tokens import (
    TOKEN_FILE_VERSION,
    TOKEN_FORMAT,
    TOKEN_STORE_VERSION,
    ForeignTokensError,
    TokenDataset,
    TokenStore,
    read_token_file,
)
from fvq.inference.loading import LoadedModel
from fvq.models.tokenizer import Tokenizer
from fvq.weights import atomic_write_bytes

__all__ = [
    "TOKEN_FORMAT",
    "TOKEN_FORMAT_VERSION",
    "TOKEN_STORE_VERSION",
    "ForeignTokensError",
    "TokenFile",
    "check_tokens",
    "load_tokens",
    "save_tokens",
]

TOKEN_FORMAT_VERSION = TOKEN_FILE_VERSION
"""Version of the single-file format that :func:`save_tokens` writes (stores are :data:`TOKEN_STORE_VERSION`)."""
_INT32_MAX = 2**31 - 1


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


def load_tokens(path: str | os.PathLike, *, view: int = 0) -> TokenFile:
    """Read a token file written by :func:`save_tokens` (checks its format and that shapes match its metadata), or one
    view of a token store folder written by ``fvq encode DIR --out STORE``.

    Args:
        path: A ``.safetensors`` token file (version 1) or a token store folder (version 2).
        view: The view read from a store (0: the plain centre crop; see :mod:`fvq.data.tokens`). A store's view is
            read whole into memory (``N x h x w`` int64); a token file has only view 0.

    Returns:
        A :class:`TokenFile` with int64 indices ``(N, h, w)`` (or ``(N, h, w, c)``).
    """
    path = Path(path)
    if path.is_dir():
        return _load_store_view(TokenStore(path), view)
    if view != 0:
        raise ValueError(f"token file {path} holds one view per image (view 0), got view={view}")
    indices, metadata = read_token_file(path)

    def optional_int(key: str) -> int | None:
        return int(metadata[key]) if key in metadata else None

    return TokenFile(
        indices=indices,
        codebook_size=int(metadata["codebook_size"]),
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


def _load_store_view(store: TokenStore, view: int) -> TokenFile:
    if not 0 <= view < store.views:
        raise ValueError(f"token store {store.path} has views 0 .. {store.views - 1}, got view={view}")
    h, w = store.grid
    tail = (store.codes_per_position,) if store.codes_per_position > 1 else ()
    indices = torch.empty(store.num_images, h, w, *tail, dtype=torch.int64)  # (N, h, w[, c])
    sources: list[str] = []
    start = 0
    for shard in range(len(store.shards)):
        count = int(store.shards[shard]["images"])
        if count:
            indices[start : start + count] = torch.from_numpy(store.tokens(shard)[:, view].astype(np.int64))
        sources.extend(store.sources(shard))
        start += count
    meta = store.meta
    return TokenFile(
        indices=indices,
        codebook_size=store.codebook_size,
        model_identity=store.model_identity,
        sources=sources if len(sources) == store.num_images else [],
        image_size=meta.get("image_size"),
        protocol=meta.get("protocol"),
        downsample_factor=meta.get("downsample_factor"),
        skipped=store.skipped(),
        model_weights_sha256=meta.get("model_weights_sha256"),
        model_config_sha256=meta.get("model_config_sha256"),
        fvq_version=meta.get("fvq_version"),
    )


def check_tokens(
    model: Tokenizer | LoadedModel, tokens: TokenFile | TokenStore | TokenDataset, *, force: bool = False
) -> None:
    """Refuse tokens this model cannot decode correctly.

    Args:
        model: The model that will decode (a :class:`Tokenizer` or a :class:`LoadedModel`).
        tokens: The token file, or a token store (:class:`~fvq.data.tokens.TokenStore` or
            :class:`~fvq.data.tokens.TokenDataset`: the ids of a store are checked as they are read).
        force: Decode tokens made by another model anyway (ids are still range-checked).

    Raises:
        ForeignTokensError: Another model made the tokens (unless ``force``).
        ValueError: The number of codes per position differs, or ids lie outside ``[0, codebook_size)`` (the message
            names the offending range and the first image).
    """
    loaded = LoadedModel.of(model)
    tokenizer = loaded.tokenizer
    if isinstance(tokens, TokenDataset):
        tokens = tokens.store
    if not force and tokens.model_identity != loaded.identity:
        raise ForeignTokensError(
            f"these tokens were made by model {tokens.model_identity or '(unknown)'} but the model given is "
            f"{loaded.identity}; another model's tokens decode to garbage. Use the model that encoded them, or pass "
            f"force=True to decode anyway"
        )
    codes = int(getattr(tokenizer.quantizer, "codes_per_position", 1))
    if tokens.codes_per_position != codes:
        shape = f"indices {tuple(tokens.indices.shape)}" if isinstance(tokens, TokenFile) else f"store {tokens.path}"
        raise ValueError(
            f"the tokens have {tokens.codes_per_position} code(s) per position ({shape}) but the model uses {codes}"
        )
    size = tokenizer.codebook_size
    if isinstance(tokens, TokenStore):
        if tokens.codebook_size > size:
            raise ValueError(
                f"token ids must lie in [0, {size - 1}] for this model (codebook_size {size}); the store {tokens.path} "
                f"was made with {tokens.codebook_size} codes"
            )
        return
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
