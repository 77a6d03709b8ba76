"""Codebooks initialised from the features of a pretrained image encoder (VQGAN-LC).

VQGAN-LC: Zhu et al., "Scaling the Codebook Size of VQGAN to 100,000 with a Utilization Rate of 99%", NeurIPS 2024,
https://arxiv.org/abs/2406.11837 . It clusters patch features of a pretrained encoder (CLIP ViT) into K centres,
keeps that codebook frozen and trains one linear projector from the feature width to the encoder's ``D``.

In fvq this is a *source* of the one k-means initialisation of :class:`~fvq.quantizers.vq.VectorQuantizer`
(``kmeans_init=True``): with ``kmeans_source="latents"`` (the default) k-means runs on the quantizer's own inputs
of the first training batches; with ``kmeans_source={"type": "features", ...}`` it runs on the features computed
here, on the first training forward pass, on rank 0 (then broadcast), and once (``initted`` is in the state dict, so a
resumed or loaded model never recomputes them). The raw codebook then has the features' width ``C``; a projector
mapping ``C -> D`` (``LinearProjector(input_dim=C)``, filled in by the config builder) is needed when ``C != D``.
``kmeans_iters``, ``kmeans_seeding`` and ``kmeans_max_samples`` apply as for latents; ``kmeans_iters: 0`` with
``kmeans_seeding: random`` takes K distinct sampled features instead of centroids.

A features source (all keys but ``type``, ``images`` optional)::

    {"type": "features", "encoder": "vgg16", "layer": "relu3_3", "images": {"type": "folder", "path": DIR,
     "image_size": 224}, "split": "train", "num_images": 1000, "batch_size": 32, "seed": 0}

``images`` is a dataset config of :func:`fvq.data.build.build_dataset`, read in its ``split`` (default ``train``, the
images the tokenizer trains on: the codebook must not see held-out images; its crops are a pure function of the seed);
every spatial position of the chosen layer is one feature vector. Encoders are looked up in :data:`FEATURE_ENCODERS`;
:func:`register_feature_encoder` adds one. ``vgg16`` is the ImageNet VGG16 trunk that LPIPS ships offline
(:mod:`fvq.losses.lpips`; no download), with LPIPS's input scaling for images in ``[-1, 1]``. The image encoder and
the datasets live in layers above the quantizers; they are imported only when a features source is resolved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fvq.quantizers.kmeans import kmeans
from fvq.quantizers.search import DEFAULT_MAX_CHUNK_BYTES

KMEANS_SOURCES = ("latents", "features")
FEATURES_KEYS = ("type", "encoder", "layer", "images", "split", "num_images", "batch_size", "seed")


@dataclass(frozen=True)
class FeatureEncoderSpec:
    """A registered feature encoder.

    Attributes:
        build: ``build(layer) -> module`` mapping images ``(B, 3, H, W)`` in ``[-1, 1]`` to ``(B, C, h, w)``.
        channels: ``{layer name: C}`` for every layer ``build`` accepts.
        default_layer: The layer used when a config gives none.
    """

    build: Callable[[str], nn.Module]
    channels: dict[str, int]
    default_layer: str


class _ScaledTrunk(nn.Module):
    """LPIPS's input scaling (ImageNet statistics in ``[-1, 1]`` units) followed by a VGG16 trunk prefix."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.layers = layers

    def forward(self, images: Tensor) -> Tensor:
        x = (images - self.shift) / self.scale  # (B, 3, H, W)
        return self.layers(x)  # (B, C, h, w)


_VGG16_TAPS = {
    "relu1_2": (3, 64),
    "relu2_2": (8, 128),
    "relu3_3": (15, 256),
    "relu4_3": (22, 512),
    "relu5_3": (29, 512),
}


def vgg16_trunk(layer: str = "relu3_3") -> nn.Module:
    """The ImageNet VGG16 trunk up to ``layer`` (weights from the offline LPIPS files), frozen, in eval mode.

    Raises:
        ValueError: unknown layer.
        fvq.weights.WeightsNotFoundError: no VGG16 weights installed (the message says how to get them).
    """
    if layer not in _VGG16_TAPS:
        raise ValueError(f"vgg16 feature layer must be one of {sorted(_VGG16_TAPS)}, got {layer!r}")
    from fvq.losses.lpips import load_weights, vgg16_features  # the layer above; imported only when asked for

    features = vgg16_features()
    state = {k.removeprefix("features."): v for k, v in load_weights("vgg16").items() if k.startswith("features.")}
    features.load_state_dict(state)
    trunk = _ScaledTrunk(features[: _VGG16_TAPS[layer][0] + 1])
    return trunk.requires_grad_(False).eval()


FEATURE_ENCODERS: dict[str, FeatureEncoderSpec] = {
    "vgg16": FeatureEncoderSpec(
        build=vgg16_trunk, channels={k: c for k, (_, c) in _VGG16_TAPS.items()}, default_layer="relu3_3"
    ),
}


def register_feature_encoder(name: str, spec: FeatureEncoderSpec) -> None:
    """Make ``name`` usable as ``encoder`` in a features source."""
    if not isinstance(spec, FeatureEncoderSpec):
        raise TypeError(f"spec must be a FeatureEncoderSpec, got {type(spec).__name__}")
    FEATURE_ENCODERS[name] = spec


def check_kmeans_source(source: str | Mapping[str, Any]) -> dict[str, Any] | None:
    """Validate a ``kmeans_source``; returns the features config with defaults filled in, or None for latents.

    Raises:
        ValueError: unknown source type, encoder, layer or key, or out-of-range numbers (the message lists the
            valid choices).
    """
    if source == "latents":
        return None
    if isinstance(source, str) or not isinstance(source, Mapping):
        raise ValueError(
            f"kmeans_source must be 'latents' or a dict {{'type': 'features', 'encoder': ..., 'images': ...}}, "
            f"got {source!r}"
        )
    if source.get("type") != "features":
        raise ValueError(f"kmeans_source type must be one of {KMEANS_SOURCES}, got {source.get('type')!r}")
    unknown = sorted(set(source) - set(FEATURES_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown} in kmeans_source; valid keys: {sorted(FEATURES_KEYS)}")
    config = dict(source)
    encoder = config.get("encoder")
    if encoder not in FEATURE_ENCODERS:
        raise ValueError(
            f"kmeans_source encoder must be one of {sorted(FEATURE_ENCODERS)} (register_feature_encoder adds "
            f"others), got {encoder!r}"
        )
    spec = FEATURE_ENCODERS[encoder]
    config.setdefault("layer", spec.default_layer)
    if config["layer"] not in spec.channels:
        raise ValueError(f"encoder {encoder!r} has layers {sorted(spec.channels)}, got layer {config['layer']!r}")
    if not isinstance(config.get("images"), Mapping):
        raise ValueError(
            "kmeans_source needs 'images': a dataset config such as {'type': 'folder', 'path': DIR, 'image_size': 224}"
        )
    config.setdefault("num_images", 1000)
    config.setdefault("batch_size", 32)
    config.setdefault("seed", 0)
    config.setdefault("split", "train")
    if config["split"] not in ("train", "val", "test"):
        raise ValueError(f"kmeans_source split must be 'train', 'val' or 'test', got {config['split']!r}")
    for key in ("num_images", "batch_size"):
        if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1:
            raise ValueError(f"kmeans_source {key} must be an integer >= 1, got {config[key]!r}")
    return config


def feature_dim(source: Mapping[str, Any]) -> int:
    """Channels C of the features a (validated) features source yields."""
    return FEATURE_ENCODERS[source["encoder"]].channels[source["layer"]]


@torch.no_grad()
def encoder_features(encoder: nn.Module, images: Iterable[Tensor], device: torch.device | None = None) -> Tensor:
    """Every spatial feature vector of ``encoder`` over ``images``.

    Args:
        encoder: Module mapping ``(B, 3, H, W)`` to ``(B, C, h, w)``.
        images: Batches ``(B, 3, H, W)``.
        device: Where the encoder runs (default: the encoder's device).

    Returns:
        ``(N, C)`` fp32 features, ``N = sum B * h * w``, on the CPU.
    """
    if device is None:
        param = next(encoder.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    rows = []
    for batch in images:
        feats = encoder(batch.to(device))  # (B, C, h, w)
        if feats.ndim != 4:
            raise ValueError(f"the feature encoder must return (B, C, h, w), got shape {tuple(feats.shape)}")
        rows.append(feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).float().cpu())  # (B*h*w, C)
    if not rows:
        raise ValueError("no images were given to compute features from")
    return torch.cat(rows)


def source_images(source: Mapping[str, Any]) -> Iterable[Tensor]:
    """Batches of the first ``num_images`` images of the source's dataset, in the source's ``split``."""
    from fvq.data.build import build_dataset  # the layer above; imported only when asked for

    dataset = build_dataset(source["images"], source["split"])
    count = min(source["num_images"], len(dataset))
    batch: list[Tensor] = []
    for i in range(count):
        item = dataset[i]
        batch.append(item.image if hasattr(item, "image") else item)
        if len(batch) == source["batch_size"] or i == count - 1:
            yield torch.stack(batch)  # (B, 3, S, S)
            batch = []


def source_features(source: Mapping[str, Any], device: torch.device | None = None) -> Tensor:
    """``(N, C)`` features of a validated features source (builds its encoder and reads its images)."""
    spec = FEATURE_ENCODERS[source["encoder"]]
    encoder = spec.build(source["layer"])
    if device is not None:
        encoder = encoder.to(device)
    return encoder_features(encoder, source_images(source), device)


def feature_codebook(
    features: Tensor,
    codebook_size: int,
    *,
    iters: int = 10,
    seeding: str = "kmeans++",
    max_samples: int | None = None,
    seed: int = 0,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> Tensor:
    """The ``(K, C)`` codebook a features source yields: k-means centroids of ``features`` (or, with ``iters=0`` and
    ``seeding="random"``, K distinct feature vectors), deterministic given ``seed``.

    Args:
        features: ``(N, C)``, ``N >= codebook_size`` (after subsampling to ``max_samples``).
        codebook_size: K.
        iters: Lloyd iterations (0: the seeds themselves).
        seeding: ``"kmeans++"`` or ``"random"``.
        max_samples: Random subset of the features clustered (``None``: all; never fewer than K).
        seed: Seed of the subset, the seeding and empty-cluster handling.
        max_chunk_bytes: Memory bound of one distance block.
    """
    if features.shape[0] < codebook_size:
        raise ValueError(
            f"{features.shape[0]} feature vectors cannot initialise {codebook_size} codes; give more images "
            "(num_images), an earlier layer (more positions per image) or larger images"
        )
    generator = torch.Generator(device=features.device).manual_seed(seed)
    if max_samples is not None and features.shape[0] > max_samples:
        keep = max(max_samples, codebook_size)
        features = features[torch.randperm(features.shape[0], generator=generator, device=features.device)[:keep]]
    result = kmeans(
        features, codebook_size, iters=iters, seeding=seeding, generator=generator, max_chunk_bytes=max_chunk_bytes
    )
    return result.centroids
