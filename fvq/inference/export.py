"""Export a training model for inference (``config.json`` + ``model.safetensors``) and verify the result.

:func:`export_model` folds the codebook projector (e.g. FVQ's VQBridge) into a plain codebook, writes the folder, reads
it back and checks with :func:`verify_export` that it gives exactly the training model's indices and reconstructions.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fvq.inference.loading import (
    LoadedModel,
    export_with_provenance,
    is_exported_folder,
    load_model,
    resolve_device,
)
from fvq.models.tokenizer import CONFIG_NAME, WEIGHTS_NAME, Tokenizer
from fvq.runs import RunFolder

__all__ = [
    "ExportReport",
    "ExportVerificationError",
    "OutputFolderNotEmptyError",
    "describe_bytes",
    "export_model",
    "verify_export",
]


class ExportVerificationError(RuntimeError):
    """The exported model did not reproduce the training model's indices or reconstructions."""


class OutputFolderNotEmptyError(ValueError):
    """The folder to export into holds files already (``force=True`` writes into it anyway)."""


@dataclass
class ExportReport:
    """What :func:`export_model` did.

    Attributes:
        out_dir: Folder written (``config.json`` + ``model.safetensors``).
        source: Checkpoint (or folder) that was exported.
        step: Training step of the checkpoint (``None`` for a folder).
        identity: :func:`~fvq.inference.loading.model_identity` of the exported model.
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

    Raises:
        OutputFolderNotEmptyError: ``out_dir`` holds files and ``force`` is False.
        ExportVerificationError: The folder read back differs from the training model (nothing is kept).
    """
    source, out_dir = Path(source), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder; the model is written into a folder")
    if not force and not _folder_is_empty(out_dir):
        raise OutputFolderNotEmptyError(
            f"{out_dir} is not empty; choose an empty or new folder, or pass force=True to write into it"
        )
    device = resolve_device(device)
    loaded = load_model(source, device=device, export=False)  # as trained: the reference of the verification
    trained, checkpoint, provenance = loaded.tokenizer, loaded.path, loaded.provenance
    source_bytes = (checkpoint / WEIGHTS_NAME if is_exported_folder(checkpoint) else checkpoint).stat().st_size
    # Writing config.json into a run folder would make it look like an exported model to every loader.
    protected = {source.resolve(), checkpoint.resolve() if checkpoint.is_dir() else checkpoint.parent.resolve()}
    run = RunFolder.containing(checkpoint) if checkpoint.is_file() else None
    if run is not None:
        protected.add(run.path.resolve())
    if out_dir.resolve() in protected:
        raise ValueError(f"the output folder {out_dir} is the run or folder being exported; choose another folder")
    exported = export_with_provenance(trained, provenance)
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
    identity = LoadedModel(reloaded, path=out_dir).identity
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


def _state_bytes(tokenizer: Tokenizer) -> int:
    return sum(t.numel() * t.element_size() for t in tokenizer.state_dict().values())


def describe_bytes(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    if size < 1024:
        return f"{size} B"
    exponent = min(int(math.log(size, 1024)), 4)
    return f"{size / 1024**exponent:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][exponent]}"
