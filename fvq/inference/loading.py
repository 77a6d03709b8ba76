"""The one model loader: an exported folder, a training run folder or a training checkpoint -> a :class:`LoadedModel`.

Training models are exported on the fly (:meth:`Tokenizer.export` folds a codebook projector such as FVQ's VQBridge
into a plain codebook), which gives identical indices and reconstructions; a model is named by
:func:`model_identity`, the identity of that inference form, so tokens encoded with a run decode with its export.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fvq.models.tokenizer import CONFIG_NAME, WEIGHTS_NAME, Tokenizer
from fvq.runs import RunFolder, latest_checkpoint, load_checkpoint

__all__ = [
    "LoadedModel",
    "config_digest",
    "load_model",
    "model_identity",
    "resolve_device",
    "weights_digest",
]


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


def _hash_tokenizer(inference_form: Tokenizer) -> tuple[str, str, str]:
    """``(identity, weights digest, config digest)`` of a tokenizer hashed as it is."""
    if inference_form.config is None:
        raise ValueError("this Tokenizer has no config (built from modules); build it with Tokenizer.from_config")
    weights = weights_digest(inference_form.state_dict())
    config = config_digest(inference_form.config)
    return f"{weights}+{config[:16]}", weights, config


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
        return _hash_tokenizer(model.export())[0]
    return load_model(model).identity


# ---------------------------------------------------------------------------------------------------------------------
# the loaded model
@dataclass
class LoadedModel:
    """A loaded model and what is known about it.

    Attributes:
        tokenizer: The model in eval mode: its inference form (projectors folded into the codebook) unless it was
            loaded with ``export=False``.
        path: The exported folder or the training checkpoint file that was read.
        image_size: Training crop size recorded for the model (``None`` when unknown, e.g. imported models).
        protocol: Evaluation crop recorded for the model (``"llamagen"`` / ``"fvq"``), or ``None``.
        exported_on_the_fly: True when ``path`` held a training model that was exported in memory.
        step: Training step of the checkpoint (``None`` for exported folders).
        provenance: What the training checkpoint records about the model (checkpoint name, step, training image
            size, evaluation crop), written under ``exported_from`` by an export; empty for exported folders.
        inference_form: True when ``tokenizer`` is hashed as it is by :attr:`identity`; False for a training model,
            whose identity is that of its export.

    The digests (:attr:`identity`, :attr:`weights_sha256`, :attr:`config_sha256`) are computed on first use.
    """

    tokenizer: Tokenizer
    path: Path
    image_size: int | None = None
    protocol: str | None = None
    exported_on_the_fly: bool = False
    step: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    inference_form: bool = True

    @classmethod
    def of(cls, model: Tokenizer | LoadedModel) -> LoadedModel:
        """A :class:`LoadedModel` view of a tokenizer (identity of its export; training image size if recorded),
        with its digests computed now; a :class:`LoadedModel` is returned as it is."""
        if isinstance(model, LoadedModel):
            return model
        if not isinstance(model, Tokenizer):
            raise TypeError(f"expected a Tokenizer or a LoadedModel, got {type(model).__name__}")
        provenance = (model.config or {}).get("exported_from") or {}
        loaded = cls(
            tokenizer=model,
            path=Path("."),
            image_size=_optional_int(provenance.get("image_size")),
            protocol=provenance.get("eval_crop"),
            inference_form=False,
        )
        _ = loaded.identity  # fails now, not after encoding, when the tokenizer has no config
        return loaded

    @cached_property
    def _digests(self) -> tuple[str, str, str]:
        return _hash_tokenizer(self.tokenizer if self.inference_form else self.tokenizer.export())

    @property
    def identity(self) -> str:
        """:func:`model_identity` of the model."""
        return self._digests[0]

    @property
    def weights_sha256(self) -> str:
        """:func:`weights_digest` of its inference form's state dict (SHA-256 of names, dtypes, shapes and bytes)."""
        return self._digests[1]

    @property
    def config_sha256(self) -> str:
        """:func:`config_digest` of its inference form's config."""
        return self._digests[2]


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


# ---------------------------------------------------------------------------------------------------------------------
# loading
def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other values as :class:`torch.device`."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def is_exported_folder(path: Path) -> bool:
    """True for a folder holding an exported (or ``save_pretrained``) model."""
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def _has_projector(config: Any) -> bool:
    if isinstance(config, dict):
        return "projector" in config or any(_has_projector(v) for v in config.values())
    if isinstance(config, list):
        return any(_has_projector(v) for v in config)
    return False


def resolve_checkpoint(path: Path) -> Path:
    """The training checkpoint file behind a run folder (its newest ``checkpoints/step_*.pt``, or the newest
    ``step_*.pt`` of a folder of checkpoints) or a checkpoint path."""
    if path.is_dir():
        found = RunFolder(path).latest_checkpoint() or latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"{path} holds neither an exported model ({CONFIG_NAME} + {WEIGHTS_NAME}) nor training checkpoints "
                f"(checkpoints/step_*.pt)"
            )
        return found
    if not path.is_file():
        raise FileNotFoundError(f"no model, run folder or checkpoint found at {path}")
    return path


def _training_provenance(checkpoint: Path, state: Mapping[str, Any]) -> dict[str, Any]:
    """Checkpoint name, step, training image size and evaluation crop recorded in a training checkpoint."""
    config = state["config"]
    data = config.get("data") or {}
    val_data = config.get("val_data") or data
    info: dict[str, Any] = {"checkpoint": checkpoint.name, "step": int(state.get("step", 0))}
    if isinstance(data, dict):
        info["image_size"] = int(data.get("image_size", 32))  # build_dataset's default
    if isinstance(val_data, dict) and val_data.get("type", "embedded") in ("folder", "shards"):
        info["eval_crop"] = str(val_data.get("eval_crop", "llamagen"))
    return info


def export_with_provenance(tokenizer: Tokenizer, provenance: Mapping[str, Any]) -> Tokenizer:
    """The inference form of a training model (eval mode), ``provenance`` recorded under ``exported_from``."""
    exported = tokenizer.export().eval()
    if exported.config is not None:
        exported.config.setdefault("exported_from", {}).update(copy.deepcopy(dict(provenance)))
    return exported


def _load_checkpoint(checkpoint: Path, device: torch.device, export: bool) -> LoadedModel:
    state = load_checkpoint(checkpoint, mmap=True)  # tensors stay on disk until copied into the model
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError(f"{checkpoint} is not an fvq training checkpoint (expected 'config' and 'model' entries)")
    provenance = _training_provenance(checkpoint, state)
    config = state["config"]
    tokenizer = Tokenizer.from_config({"model": config["model"], "quantizer": config["quantizer"]})
    tokenizer.load_state_dict(state["model"])
    tokenizer = tokenizer.to(device).eval()
    if export:
        tokenizer = export_with_provenance(tokenizer, provenance)
    return LoadedModel(
        tokenizer=tokenizer,
        path=checkpoint,
        image_size=provenance.get("image_size"),
        protocol=provenance.get("eval_crop"),
        exported_on_the_fly=export,
        step=provenance["step"],
        provenance=provenance,
        inference_form=export,
    )


def _load_folder(path: Path, device: torch.device, export: bool) -> LoadedModel:
    config = json.loads((path / CONFIG_NAME).read_text())
    tokenizer = Tokenizer.from_pretrained(path, map_location=device)
    recorded = config.get("exported_from") or {}
    # a folder written by save_pretrained during training still holds the projector: fold it now
    folded = export and _has_projector(config.get("quantizer"))
    if folded:
        tokenizer = tokenizer.export().eval()
    return LoadedModel(
        tokenizer=tokenizer,
        path=path,
        image_size=_optional_int(recorded.get("image_size")),
        protocol=recorded.get("eval_crop"),
        exported_on_the_fly=folded,
        inference_form=folded or not _has_projector(config.get("quantizer")),
    )


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", export: bool = True) -> LoadedModel:
    """Load a model from an exported folder, a training run folder or a training checkpoint.

    By default training models (and saved folders that still hold a projector) are exported in memory: indices and
    reconstructions are identical to the training model's in eval mode.

    Args:
        path: Exported folder, run folder (its newest ``checkpoints/step_*.pt``) or checkpoint file.
        device: Where to put the model (``"auto"`` picks CUDA when available).
        export: Give the inference form (projectors folded into the codebook); ``False`` gives the model as it was
            trained or saved (its :attr:`~LoadedModel.identity` is still that of its export).

    Returns:
        A :class:`LoadedModel` whose tokenizer is in eval mode on ``device``.
    """
    path = Path(path)
    device = resolve_device(device)
    if is_exported_folder(path):
        return _load_folder(path, device, export)
    return _load_checkpoint(resolve_checkpoint(path), device, export)
