"""The image tokenizer: encoder -> 1x1 conv -> quantizer -> 1x1 conv -> decoder (a VQGAN generator).

``Tokenizer`` composes any encoder, any :class:`~fvq.quantizers.base.Quantizer` and any decoder. Built with
:meth:`Tokenizer.from_config`, it records its configuration as plain data, and :meth:`Tokenizer.save_pretrained` /
:meth:`Tokenizer.from_pretrained` round-trip it through ``config.json`` + ``model.safetensors`` (no pickle).
:meth:`Tokenizer.export` folds a codebook projector (e.g. FVQ's VQBridge) into a plain codebook for inference.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fvq.quantizers.base import Quantizer, QuantizerOutput, values_checked

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
_METADATA_KEYS = ("fvq_version", "format_version")
_CONFIG_KEYS = ("model", "quantizer", "exported_from", "imported_from", *_METADATA_KEYS)


@dataclass
class TokenizerOutput:
    """Result of :meth:`Tokenizer.forward`.

    Attributes:
        reconstruction: Decoded images ``(B, 3, H, W)``, same size as the input (not clamped).
        quantizer: The quantizer's output on the latent grid: ``quantized`` ``(B, D, H / f, W / f)`` with
            straight-through gradients, ``indices`` ``(B, H / f, W / f)`` int64 (plus a trailing axis for multi-code
            quantizers), ``loss`` (weighted quantizer loss, scalar), ``losses`` and ``metrics``.
    """

    reconstruction: Tensor
    quantizer: QuantizerOutput

    @property
    def indices(self) -> Tensor:
        """Token ids ``(B, H / f, W / f)`` (shortcut for ``quantizer.indices``)."""
        return self.quantizer.indices


def _build_quantizer(config: dict[str, Any]) -> Quantizer:
    from fvq.quantizers.registry import build_quantizer

    return build_quantizer(copy.deepcopy(config))


def export_config(config: dict[str, Any]) -> dict[str, Any]:
    from fvq.quantizers.registry import export_config as _export_config

    return _export_config(config)


def _state_signature(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


class Tokenizer(nn.Module):
    """Discrete image tokenizer: images in ``[-1, 1]`` <-> a grid of code indices.

    Args:
        encoder: Module mapping ``(B, C, H, W)`` images to ``(B, z_channels, H / f, W / f)``; it must expose
            ``in_channels``, ``z_channels`` and ``downsample_factor`` (as :class:`~fvq.models.autoencoder.Encoder`).
        quantizer: Any fvq quantizer; ``quant_conv`` maps ``z_channels`` to its ``codebook_dim``.
        decoder: Module mapping ``(B, z_channels, h, w)`` to images; it must expose ``z_channels`` and ``conv_out``
            (as :class:`~fvq.models.autoencoder.Decoder`).
        config: The plain-data config this model was built from (``{"model": ..., "quantizer": ...}``); needed by
            :meth:`save_pretrained`. :meth:`from_config` sets it.

    Submodules (state-dict prefixes): ``encoder``, ``quant_conv`` (1x1, ``z_channels -> D``), ``quantizer``,
    ``post_quant_conv`` (1x1, ``D -> z_channels``), ``decoder``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        quantizer: Quantizer,
        decoder: nn.Module,
        *,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(quantizer, Quantizer):
            raise TypeError(f"quantizer must be an fvq Quantizer, got {type(quantizer).__name__}")
        for name, module, attrs in (
            ("encoder", encoder, ("in_channels", "z_channels", "downsample_factor")),
            ("decoder", decoder, ("z_channels", "conv_out")),
        ):
            missing = [a for a in attrs if not hasattr(module, a)]
            if missing:
                raise TypeError(f"{name} ({type(module).__name__}) must expose {list(attrs)}; missing {missing}")
        self.encoder = encoder
        self.quant_conv = nn.Conv2d(encoder.z_channels, quantizer.codebook_dim, kernel_size=1)
        self.quantizer = quantizer
        self.post_quant_conv = nn.Conv2d(quantizer.codebook_dim, decoder.z_channels, kernel_size=1)
        self.decoder = decoder
        self.config = copy.deepcopy(config) if config is not None else None

    # ---------------------------------------------------------------------------------------------------------------
    # construction
    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Tokenizer:
        """Build a tokenizer from plain data.

        Args:
            config: ``{"model": model_config, "quantizer": quantizer_config}`` where ``model_config`` is
                ``{"preset": name, **overrides}`` or explicit encoder/decoder keys (see :mod:`fvq.models.presets`)
                and ``quantizer_config`` is a quantizer-registry config, e.g.
                ``{"type": "vq", "codebook_size": 16384, "codebook_dim": 256, "projector": {"type": "vq_bridge"}}``.
                ``exported_from`` / ``imported_from`` entries are kept as provenance.

        Returns:
            A freshly initialised tokenizer whose ``config`` holds the fully resolved model config.
        """
        from fvq.models.presets import build_autoencoder, resolve_model_config

        if not isinstance(config, dict):
            raise TypeError(f"tokenizer config must be a dict, got {type(config).__name__}")
        missing = [k for k in ("model", "quantizer") if k not in config]
        if missing:
            raise ValueError(f"tokenizer config needs keys 'model' and 'quantizer'; missing {missing}")
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown tokenizer config keys {unknown}; expected a subset of {list(_CONFIG_KEYS)}")
        cfg = {k: copy.deepcopy(v) for k, v in config.items() if k not in _METADATA_KEYS}
        cfg["model"] = resolve_model_config(cfg["model"])
        encoder, decoder = build_autoencoder(cfg["model"])
        quantizer = _build_quantizer(cfg["quantizer"])
        return cls(encoder, quantizer, decoder, config=cfg)

    # ---------------------------------------------------------------------------------------------------------------
    # properties
    @property
    def downsample_factor(self) -> int:
        """Spatial reduction ``f`` from image to token grid (16 for VQ-16)."""
        return int(self.encoder.downsample_factor)

    @property
    def codebook_size(self) -> int:
        """Distinct ids at one code position."""
        return int(self.quantizer.codebook_size)

    @property
    def codebook_dim(self) -> int:
        """Channels ``D`` of the quantized latents."""
        return int(self.quantizer.codebook_dim)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's final conv weight, ``(3, C, 3, 3)``: the layer the adaptive GAN weight differentiates."""
        return self.decoder.conv_out.weight

    def latent_shape(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(h, w)`` for ``height x width`` images (raises if not divisible by the factor)."""
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(
                f"image height and width must be divisible by the downsampling factor {f}; got {height}x{width} "
                f"(crop or resize to e.g. {max(f, height // f * f)}x{max(f, width // f * f)})"
            )
        return height // f, width // f

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (optionally only those with ``requires_grad``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---------------------------------------------------------------------------------------------------------------
    # checks
    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got a tensor of shape {tuple(images.shape)}")
        channels = int(self.encoder.in_channels)
        if images.shape[1] != channels:
            raise ValueError(
                f"images must have {channels} channels on axis 1 (B, C, H, W), got {images.shape[1]} "
                f"(shape {tuple(images.shape)})"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor scaled to [-1, 1], got dtype {images.dtype}")
        self.latent_shape(int(images.shape[2]), int(images.shape[3]))
        if values_checked() and not torch.isfinite(images).all():
            bad = int((~torch.isfinite(images)).sum())
            raise ValueError(f"images contain {bad} non-finite values (NaN or inf); expected finite values in [-1, 1]")

    def _check_latents(self, latents: Tensor) -> None:
        if not isinstance(latents, Tensor):
            raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.ndim != 4 or latents.shape[1] != self.codebook_dim:
            raise ValueError(f"latents must have shape (B, {self.codebook_dim}, h, w), got {tuple(latents.shape)}")

    # ---------------------------------------------------------------------------------------------------------------
    # forward passes
    def encode_latents(self, images: Tensor) -> Tensor:
        """Continuous latents before quantization.

        Args:
            images: ``(B, 3, H, W)`` in ``[-1, 1]``; ``H`` and ``W`` divisible by :attr:`downsample_factor`.

        Returns:
            ``(B, D, H / f, W / f)``.
        """
        self._check_images(images)
        h = self.encoder(images)  # (B, z_channels, H / f, W / f)
        return self.quant_conv(h)  # (B, D, H / f, W / f)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images from (quantized) latents.

        Args:
            latents: ``(B, D, h, w)``.

        Returns:
            ``(B, 3, h * f, w * f)`` reconstructions (not clamped).
        """
        self._check_latents(latents)
        # One memory layout whatever the quantizer returned: convolution kernels differ per layout in the last bits,
        # and decode(encode(x)) must equal forward(x).reconstruction exactly.
        latents = latents.contiguous()  # (B, D, h, w)
        h = self.post_quant_conv(latents)  # (B, z_channels, h, w)
        return self.decoder(h)  # (B, 3, h * f, w * f)

    def forward(self, images: Tensor) -> TokenizerOutput:
        """Encode, quantize and decode.

        Args:
            images: ``(B, 3, H, W)`` in ``[-1, 1]``.

        Returns:
            :class:`TokenizerOutput` with ``reconstruction`` ``(B, 3, H, W)`` and the quantizer's output.
        """
        latents = self.encode_latents(images)  # (B, D, h, w)
        quantized = self.quantizer(latents)  # quantized (B, D, h, w), indices (B, h, w)
        reconstruction = self.decode_latents(quantized.quantized)  # (B, 3, H, W)
        return TokenizerOutput(reconstruction=reconstruction, quantizer=quantized)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images to token ids.

        Args:
            images: ``(B, 3, H, W)`` in ``[-1, 1]``.

        Returns:
            int64 indices ``(B, H / f, W / f)`` (plus a trailing axis for multi-code quantizers).
        """
        return self.quantizer.encode(self.encode_latents(images))

    def decode(self, indices: Tensor) -> Tensor:
        """Token ids to images. In eval mode ``decode(encode(x))`` equals ``forward(x).reconstruction``.

        Args:
            indices: Integer ids with the quantizer's :attr:`~fvq.quantizers.base.Quantizer.index_shape`: ``(B, h, w)``
                (plus a trailing axis for multi-code quantizers; ``(B, L)`` for the multi-scale one).

        Returns:
            ``(B, 3, h * f, w * f)`` images.
        """
        if not isinstance(indices, Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        layout = self.quantizer.index_shape  # e.g. "(B, h, w)"
        if indices.ndim != layout.count(",") + 1:
            raise ValueError(f"indices must have the axes {layout} of this quantizer, got shape {tuple(indices.shape)}")
        latents = self.quantizer.decode(indices)  # (B, D, h, w)
        return self.decode_latents(latents)  # (B, 3, h * f, w * f)

    # ---------------------------------------------------------------------------------------------------------------
    # export / save / load
    @torch.no_grad()
    def export(self) -> Tokenizer:
        """A copy for inference with the quantizer's training-only parts folded away (``quantizer.export()``).

        For a VQBridge quantizer the mapped codebook ``f(C)`` becomes a plain codebook: indices and reconstructions
        are identical and the bridge and raw codebook are gone. The config keeps only what the exported quantizer
        needs (no ``projector``, no training-only options) and records the original config under ``exported_from``.
        """
        quantizer = self.quantizer.export()
        config = None
        if self.config is not None:
            config = copy.deepcopy(self.config)
            original = config["quantizer"]
            config["quantizer"] = export_config(original)
            config.setdefault("exported_from", {"quantizer": original})
            rebuilt = _state_signature(_build_quantizer(config["quantizer"]))
            if rebuilt != _state_signature(quantizer):
                raise RuntimeError(
                    f"{type(self.quantizer).__name__}.export() does not match its config without projectors: "
                    f"state {_state_signature(quantizer)} vs rebuilt {rebuilt}"
                )
        exported = Tokenizer(copy.deepcopy(self.encoder), quantizer, copy.deepcopy(self.decoder), config=config)
        exported.quant_conv.load_state_dict(self.quant_conv.state_dict())
        exported.post_quant_conv.load_state_dict(self.post_quant_conv.state_dict())
        device = self.quant_conv.weight.device
        return exported.to(device).train(self.training)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` (each atomically; created if missing).

        Call on one process only (rank 0) and on the bare module (unwrapped from DDP / ``torch.compile``).

        Returns:
            The directory as a :class:`~pathlib.Path`.
        """
        from safetensors.torch import save as safetensors_save

        from fvq.version import __version__
        from fvq.weights import atomic_write_bytes

        if self.config is None:
            raise ValueError(
                "this Tokenizer has no config (it was built from modules); build it with Tokenizer.from_config(...) "
                "so that save_pretrained can record how to rebuild it"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        weights = safetensors_save(state, metadata={"format": "pt", "fvq_version": __version__})
        config = {**copy.deepcopy(self.config), "fvq_version": __version__, "format_version": FORMAT_VERSION}
        atomic_write_bytes(directory / WEIGHTS_NAME, weights)
        atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu", strict: bool = True
    ) -> Tokenizer:
        """Rebuild a tokenizer saved by :meth:`save_pretrained` (no pickle involved). Returned in eval mode.

        Args:
            directory: Folder holding ``config.json`` and ``model.safetensors``.
            map_location: Device for the weights.
            strict: Require the weights to match the model's keys exactly.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: a saved tokenizer folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                    f"(written by Tokenizer.save_pretrained or fvq's checkpoint importer)"
                )
        config = json.loads(config_path.read_text())
        version = config.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{config_path} has format_version {version!r}; this fvq reads format_version <= {FORMAT_VERSION} "
                f"(upgrade fvq)"
            )
        model = cls.from_config(config)
        state = load_file(str(weights_path), device=str(map_location))
        result = model.load_state_dict(state, strict=False)
        if strict and (result.missing_keys or result.unexpected_keys):
            raise ValueError(
                f"{weights_path} does not match the model described by {config_path}: missing keys "
                f"{result.missing_keys[:10]}, unexpected keys {result.unexpected_keys[:10]}"
            )
        return model.to(map_location).eval()

    def extra_repr(self) -> str:
        return f"downsample_factor={self.downsample_factor}, codebook_size={self.codebook_size}"
