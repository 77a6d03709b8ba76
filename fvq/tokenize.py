"""Images <-> token files, and exported models: the library behind ``fvq export``, ``encode``, ``decode`` and
``reconstruct``.

Models are given as an exported folder (``config.json`` + ``model.safetensors``), a training run folder or one
training checkpoint (:func:`load_model`). Training models are exported on the fly (:meth:`Tokenizer.export` folds a
codebook projector such as FVQ's VQBridge into a plain codebook), which gives identical tokens; a model is named by
:func:`model_identity`, the identity of that inference form, so tokens encoded with a run decode with its export.

Token file (``.safetensors``, written atomically)::

    indices   int32 (int64 when the codebook has >= 2**31 codes), shape (N, h, w), or (N, h, w, c) when
              several codes describe one position (residual, grouped quantizers)

    metadata (strings): format="fvq-tokens", format_version="1", fvq_version, num_images, grid_height, grid_width,
              codes_per_position, codebook_size, downsample_factor, image_size, protocol, model_identity
              (see model_identity), model_weights_sha256 and model_config_sha256 (the two full digests), sources
              (JSON list of file names relative to the folder given, one per image), skipped (JSON list of
              unreadable files)

In memory (:class:`TokenFile`) indices are int64, the dtype every fvq quantizer takes.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fvq.data.images import AlphaPolicy, BadFilePolicy, BadImageError, decode_image
from fvq.data.transforms import EvalCrop, to_pil, to_tensor
from fvq.models.tokenizer import CONFIG_NAME, WEIGHTS_NAME, Tokenizer
from fvq.weights import atomic_write_bytes

__all__ = [
    "PROTOCOLS",
    "TOKEN_FORMAT",
    "TOKEN_FORMAT_VERSION",
    "EncodedBatch",
    "ExportReport",
    "ExportVerificationError",
    "ImageSource",
    "LoadedModel",
    "TokenFile",
    "check_tokens",
    "collect_images",
    "config_digest",
    "decode_tokens",
    "describe_bytes",
    "encode_images",
    "existing_outputs",
    "export_model",
    "iter_decoded",
    "iter_encoded",
    "load_model",
    "load_tokens",
    "model_identity",
    "output_names",
    "resolve_device",
    "save_tokens",
    "verify_export",
    "weights_digest",
    "write_images",
]

TOKEN_FORMAT = "fvq-tokens"
TOKEN_FORMAT_VERSION = 1
PROTOCOLS = ("llamagen", "fvq")
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------------------------------------
# model identity
def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def config_digest(config: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the part of a tokenizer config that defines the model (``model`` and ``quantizer``).

    Provenance (``exported_from``, ``imported_from``) and version stamps are left out, so a model keeps its digest
    when it is re-saved or exported again.
    """
    missing = [k for k in ("model", "quantizer") if k not in config]
    if missing:
        raise ValueError(f"a tokenizer config needs 'model' and 'quantizer' entries; missing {missing}")
    text = _canonical_json({"model": config["model"], "quantizer": config["quantizer"]})
    return hashlib.sha256(text.encode()).hexdigest()


def _identity(weights_sha256: str, config_sha256: str) -> str:
    return f"{weights_sha256}+{config_sha256[:16]}"


def weights_digest(state: Mapping[str, Tensor]) -> str:
    """Hex SHA-256 over a state dict's tensors: for each name in sorted order, the name, dtype and shape (as JSON)
    and the raw bytes.

    Hashing the tensors rather than the ``model.safetensors`` file matters: safetensors writes its metadata header in
    an order that changes from one process to the next, so the same weights saved twice can differ in bytes.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(_canonical_json([name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _state_bytes(tokenizer: Tokenizer) -> int:
    return sum(t.numel() * t.element_size() for t in tokenizer.state_dict().values())


def _has_projector(config: Any) -> bool:
    if isinstance(config, dict):
        return "projector" in config or any(_has_projector(v) for v in config.values())
    if isinstance(config, list):
        return any(_has_projector(v) for v in config)
    return False


def _identity_of_exported(tokenizer: Tokenizer) -> tuple[str, str, str]:
    if tokenizer.config is None:
        raise ValueError("this Tokenizer has no config (built from modules); build it with Tokenizer.from_config")
    weights = weights_digest(tokenizer.state_dict())
    config = config_digest(tokenizer.config)
    return _identity(weights, config), weights, config


def model_identity(model: str | os.PathLike | Tokenizer) -> str:
    """Identity of a model's inference form: ``"<weights digest>+<first 16 hex of its config digest>"``
    (:func:`weights_digest` of its state dict, :func:`config_digest` of its config).

    Args:
        model: An exported folder, a training run folder or checkpoint, or a :class:`Tokenizer` (a training model is
            exported first, so a run and its export have the same identity).

    Returns:
        A string; equal identities mean the same weights and architecture.
    """
    if isinstance(model, Tokenizer):
        return _identity_of_exported(model.export())[0]
    return load_model(model).identity


# ---------------------------------------------------------------------------------------------------------------------
# loading models
@dataclass
class LoadedModel:
    """A model ready for tokenizing.

    Attributes:
        tokenizer: The inference form (projectors folded into the codebook), in eval mode.
        identity: :func:`model_identity` of ``tokenizer``.
        weights_sha256: :func:`weights_digest` of its state dict (SHA-256 of names, dtypes, shapes and bytes).
        config_sha256: :func:`config_digest` of its config.
        path: The exported folder or the training checkpoint file that was read.
        image_size: Training crop size recorded for the model (``None`` when unknown, e.g. imported models).
        protocol: Evaluation crop recorded for the model (``"llamagen"`` / ``"fvq"``), or ``None``.
        exported_on_the_fly: True when ``path`` held a training model that was exported in memory.
        step: Training step of the checkpoint (``None`` for exported folders).
    """

    tokenizer: Tokenizer
    identity: str
    weights_sha256: str
    config_sha256: str
    path: Path
    image_size: int | None = None
    protocol: str | None = None
    exported_on_the_fly: bool = False
    step: int | None = None


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other values as :class:`torch.device`."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _is_exported_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def _resolve_checkpoint(path: Path) -> Path:
    """The training checkpoint file behind a run folder or checkpoint path (same search as ``load_tokenizer``)."""
    from fvq.runs import latest_checkpoint

    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"{path} holds neither an exported model ({CONFIG_NAME} + {WEIGHTS_NAME}) nor training checkpoints "
                f"(checkpoints/step_*.pt)"
            )
        return found
    if not path.is_file():
        raise FileNotFoundError(f"no model, run folder or checkpoint found at {path}")
    return path


def _training_provenance(checkpoint: Path) -> dict[str, Any]:
    """Step, image size and evaluation crop of a training checkpoint (read memory-mapped: tensors stay on disk)."""
    from fvq.runs import load_checkpoint

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) files cannot be memory-mapped
        state = load_checkpoint(checkpoint)
    if not isinstance(state, dict) or "config" not in state:
        raise ValueError(f"{checkpoint} is not an fvq training checkpoint (expected 'config' and 'model' entries)")
    config = state["config"]
    data = config.get("data") or {}
    val_data = config.get("val_data") or data
    info: dict[str, Any] = {"checkpoint": checkpoint.name, "step": int(state.get("step", 0))}
    if isinstance(data, dict):
        info["image_size"] = int(data.get("image_size", 32))  # build_dataset's default
    if isinstance(val_data, dict) and val_data.get("type", "embedded") in ("folder", "shards"):
        info["eval_crop"] = str(val_data.get("eval_crop", "llamagen"))
    return info


def _export_with_provenance(tokenizer: Tokenizer, provenance: Mapping[str, Any]) -> Tokenizer:
    exported = tokenizer.export().eval()
    if exported.config is not None:
        exported.config.setdefault("exported_from", {}).update(copy.deepcopy(dict(provenance)))
    return exported


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model for tokenizing from an exported folder, a training run folder or a training checkpoint.

    Training models (and saved folders that still hold a projector) are exported in memory: indices and
    reconstructions are identical to the training model's in eval mode.

    Args:
        path: Exported folder, run folder (its newest ``checkpoints/step_*.pt``) or checkpoint file.
        device: Where to put the model (``"auto"`` picks CUDA when available).

    Returns:
        A :class:`LoadedModel`.
    """
    from fvq.models.loading import load_tokenizer

    path = Path(path)
    device = resolve_device(device)
    if _is_exported_folder(path):
        config = json.loads((path / CONFIG_NAME).read_text())
        tokenizer = Tokenizer.from_pretrained(path, map_location=device)
        provenance = config.get("exported_from") or {}
        on_the_fly = _has_projector(config.get("quantizer"))
        if on_the_fly:  # saved with save_pretrained during training: fold the projector now
            tokenizer = tokenizer.export().eval()
        identity, weights, digest = _identity_of_exported(tokenizer)
        return LoadedModel(
            tokenizer=tokenizer,
            identity=identity,
            weights_sha256=weights,
            config_sha256=digest,
            path=path,
            image_size=_optional_int(provenance.get("image_size")),
            protocol=provenance.get("eval_crop"),
            exported_on_the_fly=on_the_fly,
        )
    checkpoint = _resolve_checkpoint(path)
    provenance = _training_provenance(checkpoint)
    tokenizer = _export_with_provenance(load_tokenizer(checkpoint, map_location=device), provenance)
    identity, weights, digest = _identity_of_exported(tokenizer)
    return LoadedModel(
        tokenizer=tokenizer,
        identity=identity,
        weights_sha256=weights,
        config_sha256=digest,
        path=checkpoint,
        image_size=provenance.get("image_size"),
        protocol=provenance.get("eval_crop"),
        exported_on_the_fly=True,
        step=provenance["step"],
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


# ---------------------------------------------------------------------------------------------------------------------
# export
class ExportVerificationError(RuntimeError):
    """The exported model did not reproduce the training model's indices or reconstructions."""


@dataclass
class ExportReport:
    """What :func:`export_model` did.

    Attributes:
        out_dir: Folder written (``config.json`` + ``model.safetensors``).
        source: Checkpoint (or folder) that was exported.
        step: Training step of the checkpoint (``None`` for a folder).
        identity: :func:`model_identity` of the exported model.
        parameters_before: Parameters of the training model (projector included).
        parameters_after: Parameters of the exported model.
        source_bytes: Size of the source file (a training checkpoint also holds optimizer states, the
            discriminator and RNG states) or of the source folder's weights.
        weights_bytes_before: Bytes of the training model's tensors alone (its state dict).
        weights_bytes_after: Size of the written ``model.safetensors``.
        probe_images: Images on which indices and reconstructions were compared.
        probe_latents: Latent grids on which the quantizers were compared.
        distinct_codes: Distinct codes hit by the probes (a meaningful comparison needs more than one).
    """

    out_dir: Path
    source: Path
    step: int | None
    identity: str
    parameters_before: int
    parameters_after: int
    source_bytes: int
    weights_bytes_before: int
    weights_bytes_after: int
    probe_images: int
    probe_latents: int
    distinct_codes: int

    @property
    def parameters_dropped(self) -> int:
        """Parameters folded away (the projector, e.g. the VQBridge)."""
        return self.parameters_before - self.parameters_after


def _probe_images(num: int, size: int, factor: int, generator: torch.Generator) -> Tensor:
    """``(2 * num, 3, size, size)`` probes in [-1, 1]: uniform noise, and smooth fields (image-like statistics)."""
    noise = torch.rand(num, 3, size, size, generator=generator) * 2 - 1  # (num, 3, S, S)
    coarse = torch.rand(num, 3, max(1, size // factor), max(1, size // factor), generator=generator) * 2 - 1
    smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)  # (num, 3, S, S)
    return torch.cat([noise, smooth])


def _first_difference(a: Tensor, b: Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    differ = a != b
    if a.is_floating_point():
        return f"{int(differ.sum())} values differ, max abs difference {float((a - b).abs().max()):.3g}"
    return f"{int(differ.sum())} of {a.numel()} indices differ"


@torch.inference_mode()
def verify_export(
    reference: Tokenizer, exported: Tokenizer, *, image_size: int, num_probes: int = 4, seed: int = 0
) -> tuple[int, int, int]:
    """Check that ``exported`` gives exactly the indices and reconstructions of ``reference`` (both in eval mode).

    Compares ``encode`` on ``2 * num_probes`` probe images of ``image_size`` pixels (noise and smooth fields),
    ``decode`` of those indices against ``reference(images).reconstruction``, ``decode`` of ``num_probes`` grids of
    random ids (every code can occur), and the quantizers' ``encode`` on the code vectors of those ids, perturbed.

    Returns:
        ``(probe_images, probe_latents, distinct_codes)``.

    Raises:
        ExportVerificationError: Any index or reconstruction differs (the message says where and by how much).
    """
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    reference.latent_shape(image_size, image_size)
    device = reference.quant_conv.weight.device
    generator = torch.Generator().manual_seed(seed)
    images = _probe_images(num_probes, image_size, reference.downsample_factor, generator).to(device)  # (P, 3, S, S)
    expected = reference(images)
    indices = exported.encode(images)  # (P, h, w[, c])
    problems = []
    if not torch.equal(indices, expected.indices):
        problems.append(f"indices on probe images: {_first_difference(indices, expected.indices)}")
    else:
        reconstruction = exported.decode(indices)  # (P, 3, S, S)
        if not torch.equal(reconstruction, expected.reconstruction):
            problems.append(f"reconstructions: {_first_difference(reconstruction, expected.reconstruction)}")
    # Random ids cover the whole codebook, not just the few codes the probe images hit.
    ids = torch.randint(0, reference.codebook_size, expected.indices[:num_probes].shape, generator=generator)
    ids = ids.to(device)  # (p, h, w[, c])
    ref_images, exp_images = reference.decode(ids), exported.decode(ids)  # (p, 3, S, S)
    if not torch.equal(ref_images, exp_images):
        problems.append(f"reconstructions of random ids: {_first_difference(exp_images, ref_images)}")
    latents = reference.quantizer.decode(ids)  # (p, D, h, w): code vectors...
    noise = torch.randn(latents.shape, generator=generator).to(device)
    latents = latents + 0.05 * latents.std() * noise  # ...slightly perturbed
    ref_codes, exp_codes = reference.quantizer.encode(latents), exported.quantizer.encode(latents)
    if not torch.equal(ref_codes, exp_codes):
        problems.append(f"indices on latent grids: {_first_difference(exp_codes, ref_codes)}")
    elif not torch.equal(reference.quantizer.decode(ref_codes), exported.quantizer.decode(exp_codes)):
        problems.append("quantized latents differ for equal indices")
    if problems:
        raise ExportVerificationError("the exported model differs from the training model: " + "; ".join(problems))
    distinct = int(torch.unique(torch.cat([expected.indices.flatten(), ids.flatten()])).numel())
    return int(images.shape[0]), int(latents.shape[0]), distinct


def _folder_is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def export_model(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    force: bool = False,
    device: str | torch.device = "cpu",
    num_probes: int = 4,
    probe_size: int | None = None,
) -> ExportReport:
    """Export a training run or checkpoint to ``out_dir`` (``config.json`` + ``model.safetensors``) and verify it.

    The projector is folded into the codebook (:meth:`Tokenizer.export`); the config records the original quantizer
    config, the checkpoint name, step, training image size and evaluation crop under ``exported_from``. After writing
    (each file atomically) the folder is read back and must give identical indices and reconstructions
    (:func:`verify_export`); otherwise both files are removed and :class:`ExportVerificationError` is raised.

    Args:
        source: Run folder, checkpoint file, or a saved folder (re-exported).
        out_dir: Destination; must be empty or absent unless ``force`` (then the two files are replaced).
        force: Allow writing into a non-empty folder.
        device: Device for the verification passes.
        num_probes: Probe images per kind (noise, smooth) and latent grids.
        probe_size: Probe image size; default: the training image size, else ``4 * downsample_factor``.
    """
    from fvq.models.loading import load_tokenizer

    source, out_dir = Path(source), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    if not force and not _folder_is_empty(out_dir):
        raise ValueError(f"{out_dir} is not empty; choose an empty or new folder, or pass --force to write into it")
    device = resolve_device(device)
    if _is_exported_folder(source):
        checkpoint, provenance = source, {}
        source_bytes = (source / WEIGHTS_NAME).stat().st_size
        trained = Tokenizer.from_pretrained(source, map_location=device)
    else:
        checkpoint = _resolve_checkpoint(source)
        provenance = _training_provenance(checkpoint)
        source_bytes = checkpoint.stat().st_size
        trained = load_tokenizer(checkpoint, map_location=device)
    # Writing config.json into a run folder would make it look like an exported model to every loader.
    protected = {source.resolve(), checkpoint.resolve() if checkpoint.is_dir() else checkpoint.parent.resolve()}
    if checkpoint.is_file() and checkpoint.parent.name == "checkpoints":
        protected.add(checkpoint.parent.parent.resolve())
    if out_dir.resolve() in protected:
        raise ValueError(f"--out {out_dir} is the run or folder being exported; choose another folder")
    exported = _export_with_provenance(trained, provenance)
    exported.save_pretrained(out_dir)
    written = [out_dir / CONFIG_NAME, out_dir / WEIGHTS_NAME]
    try:
        reloaded = Tokenizer.from_pretrained(out_dir, map_location=device)
        size = probe_size or provenance.get("image_size") or 4 * trained.downsample_factor
        probes = verify_export(trained, reloaded, image_size=int(size), num_probes=num_probes)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    identity, _, _ = _identity_of_exported(reloaded)
    return ExportReport(
        out_dir=out_dir,
        source=checkpoint,
        step=provenance.get("step"),
        identity=identity,
        parameters_before=trained.num_parameters(),
        parameters_after=reloaded.num_parameters(),
        source_bytes=source_bytes,
        weights_bytes_before=_state_bytes(trained),
        weights_bytes_after=(out_dir / WEIGHTS_NAME).stat().st_size,
        probe_images=probes[0],
        probe_latents=probes[1],
        distinct_codes=probes[2],
    )


# ---------------------------------------------------------------------------------------------------------------------
# token files
@dataclass
class TokenFile:
    """Token ids of a set of images, with what is needed to decode them safely.

    Attributes:
        indices: int64 ``(N, h, w)``, or ``(N, h, w, c)`` for quantizers with ``c`` codes per position.
        codebook_size: Distinct ids at one code position (ids lie in ``[0, codebook_size)``).
        model_identity: :func:`model_identity` of the model that made them.
        sources: One name per image (the file's path relative to the folder given, or its file name); may be empty.
        image_size: Side of the square crops that were encoded.
        protocol: Crop protocol used (``"llamagen"`` or ``"fvq"``).
        downsample_factor: Image pixels per token along each side.
        skipped: Input files that could not be decoded and were left out.
        model_weights_sha256: :func:`weights_digest` of the model's weights (full).
        model_config_sha256: :func:`config_digest` of the model's config (full).
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

    from fvq import __version__

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
            f"{TOKEN_FORMAT!r}); write token files with `fvq encode` or fvq.tokenize.save_tokens"
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


class _CroppedImages(Dataset):
    """Decode + evaluation crop, returning ``(position, image (3, S, S) or None, converted, error or None)``."""

    def __init__(self, sources: Sequence[ImageSource], crop: EvalCrop, alpha: AlphaPolicy) -> None:
        self.sources, self.crop, self.alpha = list(sources), crop, alpha

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, position: int) -> tuple[int, Tensor | None, bool, str | None]:
        try:
            decoded = decode_image(self.sources[position].path, alpha=self.alpha)
        except BadImageError as error:
            return position, None, False, str(error)
        return position, to_tensor(self.crop(decoded.image)), decoded.converted, None  # (3, S, S)


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


def _check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return protocol


def _progress(total: int, desc: str, unit: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


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
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    tokenizer.latent_shape(image_size, image_size)
    crop = EvalCrop(image_size, _check_protocol(protocol))  # type: ignore[arg-type]
    policy = bad_files if bad_files is not None else BadFilePolicy(max_bad_fraction=1.0, min_seen=1)
    loader = DataLoader(
        _CroppedImages(sources, crop, alpha), batch_size=batch_size, num_workers=num_workers, collate_fn=list
    )
    device = tokenizer.quant_conv.weight.device
    h, w = tokenizer.latent_shape(image_size, image_size)
    codes = int(getattr(tokenizer.quantizer, "codes_per_position", 1))
    empty = torch.zeros(0, h, w, *([codes] if codes > 1 else []), dtype=torch.int64)
    with _progress(len(sources), "encode", "img", progress) as bar:
        for items in loader:
            names, images, positions, skipped = [], [], [], []
            for position, image, converted, error in items:
                if image is None:
                    policy.record_bad(sources[position].path, error or "unreadable")
                    skipped.append(sources[position].name)
                    continue
                policy.record_ok(converted=converted)
                names.append(sources[position].name)
                positions.append(position)
                images.append(image)
            bar.update(len(items))
            if not images:
                yield EncodedBatch(
                    names=[], images=torch.zeros(0, 3, image_size, image_size), indices=empty, skipped=skipped
                )
                continue
            batch = torch.stack(images)  # (B, 3, S, S)
            with torch.inference_mode():
                indices = tokenizer.encode(batch.to(device))  # (B, h, w[, c])
            yield EncodedBatch(names=names, images=batch, indices=indices.cpu(), positions=positions, skipped=skipped)


def _as_loaded(model: Tokenizer | LoadedModel) -> LoadedModel:
    """A :class:`LoadedModel` view of a tokenizer (identity of its export; training image size if recorded)."""
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, Tokenizer):
        raise TypeError(f"expected a Tokenizer or a LoadedModel, got {type(model).__name__}")
    identity, weights, digest = _identity_of_exported(model.export())
    provenance = (model.config or {}).get("exported_from") or {}
    return LoadedModel(
        tokenizer=model,
        identity=identity,
        weights_sha256=weights,
        config_sha256=digest,
        path=Path("."),
        image_size=_optional_int(provenance.get("image_size")),
        protocol=provenance.get("eval_crop"),
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
            same ids as its export), or a :class:`LoadedModel` from :func:`load_model`.
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
    loaded = _as_loaded(model)
    tokenizer = loaded.tokenizer
    if paths and all(isinstance(p, ImageSource) for p in paths):
        sources = list(paths)
    else:
        sources = collect_images(paths)  # type: ignore[arg-type]
    if image_size is None:
        if loaded.image_size is None:
            raise ValueError(
                "image_size is required: the model records no training image size (pass --image-size, e.g. 256)"
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


# ---------------------------------------------------------------------------------------------------------------------
# tokens out
def check_tokens(model: Tokenizer | LoadedModel, tokens: TokenFile, *, force: bool = False) -> None:
    """Refuse tokens this model cannot decode correctly.

    Args:
        model: The model that will decode (a :class:`Tokenizer` or a :class:`LoadedModel`).
        tokens: The token file.
        force: Decode tokens made by another model anyway (ids are still range-checked).

    Raises:
        ValueError: Another model made the tokens (unless ``force``), the number of codes per position differs, or
            ids lie outside ``[0, codebook_size)`` (the message names the offending range and the first image).
    """
    loaded = _as_loaded(model)
    tokenizer = loaded.tokenizer
    if not force and tokens.model_identity != loaded.identity:
        raise ValueError(
            f"these tokens were made by model {tokens.model_identity or '(unknown)'} but the model given is "
            f"{loaded.identity}; another model's tokens decode to garbage. Use the model that encoded them, or pass "
            f"--force (force=True) to decode anyway"
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
    loaded = _as_loaded(model)
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


def describe_bytes(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    if size < 1024:
        return f"{size} B"
    exponent = min(int(math.log(size, 1024)), 4)
    return f"{size / 1024**exponent:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][exponent]}"
