"""Evaluate a tokenizer on an image set: reconstruct every image once, report rFID, LPIPS, PSNR, SSIM and usage.

:func:`evaluate` runs the whole protocol; :class:`ReconstructionEvaluator` is its streaming core (feed it batches of
originals, reconstructions and code indices, then call :meth:`~ReconstructionEvaluator.compute`), usable on its own.

What every number means (``docs/evaluation.md`` has the long version):

* Both the originals and the reconstructions are rounded to 8 bits (``floor(255 x + 0.5)`` on [0, 1]) before any
  metric, because the standard protocols save reconstructions as PNG files and score those files. The originals of
  fvq's datasets are decoded from 8-bit files, so rounding leaves them unchanged.
* ``rfid``: Fréchet distance between the FID-Inception features of the originals and of the reconstructions, both
  through the same preprocessing (:class:`~fvq.evaluation.inception.FIDInception`). The reference statistics can be
  cached to a file and reused; the result always names the reference set.
* ``lpips_vgg`` / ``lpips_alex``: LPIPS v0.1 with the VGG16 / AlexNet trunk, mean over images.
* ``psnr_rgb`` / ``psnr_y``: PSNR over the RGB channels / on the BT.601 luma, mean over images of the per-image PSNR;
  ``psnr`` repeats the channel asked for (``psnr_channel``). An image reconstructed exactly has an infinite PSNR; it
  counts as :data:`PSNR_CAP` dB and is counted in ``exact_images``.
* ``ssim``: SSIM of Wang et al. (Gaussian window 11, sigma 1.5) with the correct data range. ``ssim_dr2``: the
  variant LlamaGen and FVQ publish (skimage defaults with ``data_range=2`` on [0, 1] images, which inflates it); only
  for comparison with their tables.
* ``usage``: fraction of the K codes used at least once over all tokens of the set (histogram summed over ranks;
  several codes per position are pooled); ``perplexity`` = exp(entropy of that histogram); ``dead_codes`` = K - used.

Under ``torch.distributed`` each rank reconstructs a disjoint share of the set (no padding, no duplicates: every
image counts exactly once) and every statistic is summed over ranks before the figures are computed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm.auto import tqdm

from fvq.data.images import batch_images
from fvq.data.transforms import EVAL_CROPS as PROTOCOLS
from fvq.data.transforms import EvalProtocol as Protocol
from fvq.distributed import all_reduce_sum_, placement
from fvq.evaluation.fid import FeatureStats, frechet_distance
from fvq.evaluation.inception import FIDInception, load_inception
from fvq.evaluation.metrics import psnr, quantize_8bit, ssim, ssim_dr2, to_unit_range
from fvq.quantizers.usage import CodebookUsage
from fvq.weights import WeightsNotFoundError

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "PROTOCOLS",
    "PSNR_CAP",
    "EvalData",
    "EvalNetworks",
    "EvalResult",
    "ReconstructionEvaluator",
    "build_eval_dataset",
    "evaluate",
    "load_eval_networks",
    "to_uint8",
]

MetricName = Literal["rfid", "lpips_vgg", "lpips_alex", "psnr", "ssim", "usage"]

METRICS: tuple[str, ...] = ("rfid", "lpips_vgg", "lpips_alex", "psnr", "ssim", "usage")
"""Metric groups :func:`evaluate` can compute (``psnr`` gives ``psnr_rgb`` and ``psnr_y``, ``ssim`` gives ``ssim``
and ``ssim_dr2``, ``usage`` gives ``usage``, ``perplexity``, ``dead_codes`` and ``tokens``)."""
DEFAULT_METRICS: tuple[str, ...] = METRICS

PSNR_CAP = 100.0
"""PSNR, in dB, given to an exactly reconstructed image (whose PSNR is infinite) so that the mean stays finite."""

_EMBEDDED_PROTOCOL = (
    "embedded held-out crops: fixed crops of the photos never trained on, each photo resized to a short side in "
    "[4 S, 5 S] and cropped to S x S (seeded, identical for every run); the llamagen/fvq crops do not apply"
)
_FEATURE_DIM = 2048
_STATS_FORMAT = "fvq-eval-reference-v1"


# ----------------------------------------------------------------------------------------------------------------
# results


@dataclass
class EvalResult:
    """The figures of one evaluation and what they mean.

    Attributes:
        metrics: Name -> value (see the module docstring for the keys); ``num_images`` included.
        protocol: ``"llamagen"``, ``"fvq"``, ``"embedded"`` or ``"custom"`` (a dataset passed in with its own crop).
        protocol_description: How the images were cropped, in words.
        reference: The set the rFID compares against (``""`` when rFID was not computed).
        dataset: The evaluated set, in words.
        image_size: Side S of the evaluated images.
        num_images: Images reconstructed and scored (over all ranks; each counted once).
        notes: Metric name -> its definition (which variant, which reference, which usage definition).
        info: Run details: world size, device, seconds, images per second, codebook size.
    """

    metrics: dict[str, float]
    protocol: str
    protocol_description: str
    reference: str
    dataset: str
    image_size: int
    num_images: int
    notes: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``metrics.json`` (infinite or NaN values become strings)."""
        out = asdict(self)
        out["metrics"] = {k: _json_number(v) for k, v in self.metrics.items()}
        return out

    def to_markdown(self, title: str | None = None) -> str:
        """A markdown table: one row per figure with the protocol / reference / definition it uses."""
        lines = [f"# {title}", ""] if title else []
        lines += [
            f"- data: {self.dataset}",
            f"- protocol: **{self.protocol}** ({self.protocol_description}), S = {self.image_size}",
            f"- images: {self.num_images}",
        ]
        if self.reference:
            lines.append(f"- rFID reference: {self.reference}")
        lines += ["", "| metric | value | definition |", "| --- | ---: | --- |"]
        for key in _ROW_ORDER:
            if key in self.metrics:
                lines.append(
                    f"| {_LABELS.get(key, key)} | {_format_value(key, self.metrics[key])} | {self.notes.get(key, '')} |"
                )
        return "\n".join(lines) + "\n"

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``metrics.json`` and ``metrics.md`` into ``directory`` (created); call on one rank only."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path, md_path = directory / "metrics.json", directory / "metrics.md"
        json_path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        md_path.write_text(self.to_markdown("fvq eval"))
        return json_path, md_path


_ROW_ORDER = (
    "rfid",
    "lpips_vgg",
    "lpips_alex",
    "psnr",
    "psnr_rgb",
    "psnr_y",
    "ssim",
    "ssim_dr2",
    "usage",
    "perplexity",
    "dead_codes",
    "tokens",
    "exact_images",
)
_LABELS = {
    "rfid": "rFID",
    "lpips_vgg": "LPIPS (VGG)",
    "lpips_alex": "LPIPS (AlexNet)",
    "psnr": "PSNR (dB)",
    "psnr_rgb": "PSNR RGB (dB)",
    "psnr_y": "PSNR Y (dB)",
    "ssim": "SSIM",
    "ssim_dr2": "SSIM, published data_range=2 variant (inflated)",
    "usage": "codebook usage",
    "perplexity": "perplexity",
    "dead_codes": "dead codes",
    "tokens": "tokens counted",
    "exact_images": "exactly reconstructed images",
}


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _format_value(key: str, value: float) -> str:
    if key == "usage":
        return f"{100 * value:.2f} %"
    if key in ("dead_codes", "tokens", "exact_images"):
        return f"{int(value)}"
    if key.startswith("psnr") or key == "rfid" or key == "perplexity":
        return f"{value:.2f}"
    return f"{value:.4f}"


# ----------------------------------------------------------------------------------------------------------------
# networks


@dataclass
class EvalNetworks:
    """The pretrained networks some metrics need (``None`` when that metric is not computed).

    Load them once with :func:`load_eval_networks` and pass them to several :func:`evaluate` calls.
    """

    inception: FIDInception | None = None
    lpips_vgg: nn.Module | None = None
    lpips_alex: nn.Module | None = None


def _with_hint(err: WeightsNotFoundError, what: str, flag: str, metric: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"{err} (or evaluate without {what}: `fvq eval ... {flag}`, or leave {metric!r} out of metrics=)"
    )


def load_eval_networks(metrics: Iterable[str], device: torch.device | str = "cpu") -> EvalNetworks:
    """Load the FID Inception and the LPIPS trunks that ``metrics`` need, from local files only.

    Args:
        metrics: Metric groups (see :data:`METRICS`).
        device: Where the networks run.

    Raises:
        WeightsNotFoundError: A weight file is missing; the message names how to install it.
    """
    from fvq.losses.lpips import LPIPS

    wanted = _check_metrics(metrics)
    nets = EvalNetworks()
    if "rfid" in wanted:
        try:
            nets.inception = load_inception(device=device)
        except WeightsNotFoundError as err:
            raise _with_hint(err, "rFID", "--no-fid", "rfid") from None
    for name, net in (("lpips_vgg", "vgg"), ("lpips_alex", "alex")):
        if name in wanted:
            try:
                setattr(nets, name, LPIPS(net).to(device))
            except WeightsNotFoundError as err:
                raise _with_hint(err, "LPIPS", "--no-lpips", name) from None
    return nets


def _check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    wanted = tuple(dict.fromkeys(metrics))
    unknown = [m for m in wanted if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; expected a subset of {list(METRICS)}")
    if not wanted:
        raise ValueError(f"metrics must name at least one of {list(METRICS)}, got none")
    return wanted


# ----------------------------------------------------------------------------------------------------------------
# the streaming evaluator


def to_uint8(images: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Round images to 8 bits as saving a PNG does: ``floor(255 x + 0.5)`` on [0, 1] values (clamped).

    Args:
        images: ``(B, 3, H, W)`` float in ``value_range`` (or ``uint8``, returned as is).
        value_range: ``(low, high)`` of floating inputs.

    Returns:
        ``(B, 3, H, W)`` ``uint8``.
    """
    if images.dtype == torch.uint8:
        return images
    return (quantize_8bit(to_unit_range(images, value_range)) * 255.0).round_().to(torch.uint8)


def _uint8_to_signed(images: Tensor) -> Tensor:
    """``uint8`` [0, 255] -> float32 [-1, 1] (exactly the values of the saved PNG)."""
    return images.to(torch.float32) / 127.5 - 1.0


@dataclass
class _Reference:
    """Reference Inception statistics: accumulated here, or loaded (FeatureStats file or an ADM-style mu/sigma)."""

    description: str
    stats: FeatureStats | None = None  # accumulated or loaded moments
    mu: Tensor | None = None  # (2048,) when loaded as mean/covariance only
    sigma: Tensor | None = None  # (2048, 2048)

    def moments(self) -> tuple[Tensor, Tensor]:
        if self.stats is not None:
            if self.stats.count < 2:
                raise ValueError(f"rFID needs at least 2 reference images, got {self.stats.count}")
            return self.stats.mean(), self.stats.covariance()
        assert self.mu is not None and self.sigma is not None
        return self.mu, self.sigma


class ReconstructionEvaluator:
    """Streams batches of (originals, reconstructions, indices) and computes every metric over the whole set.

    Memory stays bounded: per-image values are summed as they come, Inception features go into running moments
    (:class:`~fvq.evaluation.fid.FeatureStats`), code indices into a histogram. :meth:`compute` is a collective under
    ``torch.distributed`` (every rank must call it) and returns the figures of the union of all ranks' batches.

    Args:
        codebook_size: K, for the usage histogram (needed when ``"usage"`` is in ``metrics``).
        metrics: Metric groups (see :data:`METRICS`).
        networks: The loaded networks (:func:`load_eval_networks`); loaded here when ``None``.
        psnr_channel: Which PSNR ``psnr`` repeats: ``"rgb"`` (default) or ``"y"``.
        reference: Precomputed reference statistics for rFID (:class:`~fvq.evaluation.fid.FeatureStats`); when
            given, the originals' Inception features are not computed. ``None``: the originals are the reference.
        reference_description: Words naming the reference set (stored in the result).
        device: Where the accumulators and networks live.
    """

    def __init__(
        self,
        *,
        codebook_size: int | None = None,
        metrics: Sequence[str] = DEFAULT_METRICS,
        networks: EvalNetworks | None = None,
        psnr_channel: Literal["rgb", "y"] = "rgb",
        reference: FeatureStats | _Reference | None = None,
        reference_description: str = "the originals of the evaluated set (same images, same crop)",
        device: torch.device | str = "cpu",
    ) -> None:
        self.metrics = _check_metrics(metrics)
        if psnr_channel not in ("rgb", "y"):
            raise ValueError(f"psnr_channel must be 'rgb' or 'y', got {psnr_channel!r}")
        self.psnr_channel = psnr_channel
        self.device = torch.device(device)
        self.networks = networks if networks is not None else load_eval_networks(self.metrics, self.device)
        for group, net in (("rfid", "inception"), ("lpips_vgg", "lpips_vgg"), ("lpips_alex", "lpips_alex")):
            if group in self.metrics and getattr(self.networks, net) is None:
                raise ValueError(f"metric {group!r} needs networks.{net}; load it with load_eval_networks()")
        self.usage: CodebookUsage | None = None
        if "usage" in self.metrics:
            if codebook_size is None or codebook_size < 1:
                raise ValueError(f"the usage metric needs codebook_size >= 1, got {codebook_size!r}")
            self.usage = CodebookUsage(int(codebook_size), device=self.device)
        # float64 sums of per-image values, then the image count
        self._keys = self._sum_keys()
        self._sums = torch.zeros(len(self._keys) + 1, dtype=torch.float64, device=self.device)
        self.reconstruction_stats: FeatureStats | None = None
        self.reference: _Reference | None = None
        if "rfid" in self.metrics:
            dim = _feature_dim(self.networks)
            self.reconstruction_stats = FeatureStats(dim, device=self.device)
            if isinstance(reference, _Reference):
                self.reference = reference
            elif reference is not None:
                if not isinstance(reference, FeatureStats):
                    raise TypeError(f"reference must be FeatureStats or None, got {type(reference).__name__}")
                self.reference = _Reference(reference_description, stats=reference)
            else:
                self.reference = _Reference(reference_description, stats=FeatureStats(dim, self.device))
        self._accumulate_reference = "rfid" in self.metrics and reference is None

    def _sum_keys(self) -> list[str]:
        keys = []
        if "lpips_vgg" in self.metrics:
            keys.append("lpips_vgg")
        if "lpips_alex" in self.metrics:
            keys.append("lpips_alex")
        if "psnr" in self.metrics:
            keys += ["psnr_rgb", "psnr_y", "exact_images"]
        if "ssim" in self.metrics:
            keys += ["ssim", "ssim_dr2"]
        return keys

    @property
    def accumulates_reference(self) -> bool:
        """True when the originals' Inception features are accumulated here (no precomputed reference)."""
        return self._accumulate_reference

    @torch.inference_mode()
    def update(self, images: Tensor, reconstructions: Tensor, indices: Tensor | None = None) -> None:
        """Add a batch.

        Args:
            images: ``(B, 3, H, W)`` originals, float in [-1, 1] or ``uint8``.
            reconstructions: ``(B, 3, H, W)`` reconstructions, float in [-1, 1] (not clamped) or ``uint8``.
            indices: The batch's code indices, any shape with values in ``[0, K)`` (needed for ``"usage"``).
        """
        if images.shape != reconstructions.shape or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images and reconstructions must both be (B, 3, H, W), got {tuple(images.shape)} and "
                f"{tuple(reconstructions.shape)}"
            )
        x = to_uint8(images.to(self.device))  # (B, 3, H, W) uint8: the saved originals
        y = to_uint8(reconstructions.to(self.device).float())  # (B, 3, H, W) uint8: the saved reconstructions
        b = x.shape[0]
        values: dict[str, Tensor] = {}
        if "lpips_vgg" in self.metrics or "lpips_alex" in self.metrics:
            xs, ys = _uint8_to_signed(x), _uint8_to_signed(y)  # (B, 3, H, W) in [-1, 1]
            for key in ("lpips_vgg", "lpips_alex"):
                if key in self.metrics:
                    values[key] = getattr(self.networks, key)(ys, xs).double().sum()
        if "psnr" in self.metrics:
            for key, channel in (("psnr_rgb", "rgb"), ("psnr_y", "y")):
                p = psnr(x, y, channel=channel)  # (B,) float64, inf for identical images
                values[key] = p.clamp(max=PSNR_CAP).sum()
                if channel == "rgb":
                    values["exact_images"] = torch.isinf(p).sum().double()
        if "ssim" in self.metrics:
            values["ssim"] = ssim(x, y).sum()
            values["ssim_dr2"] = ssim_dr2(x, y).sum()
        if values:
            self._sums[:-1] += torch.stack([values[k].to(self.device, torch.float64) for k in self._keys])
        self._sums[-1] += b
        if "rfid" in self.metrics:
            inception = self.networks.inception
            both = torch.cat([x, y]) if self._accumulate_reference else y  # (2B or B, 3, H, W) uint8
            features = inception(both)  # (2B or B, 2048)
            self.reconstruction_stats.update(features[-b:])
            if self._accumulate_reference:
                self.reference.stats.update(features[:b])
        if self.usage is not None:
            if indices is None:
                raise ValueError("the usage metric needs the batch's code indices; pass indices=")
            self.usage.update(indices.to(self.device))

    @torch.inference_mode()
    def count_codes(self, indices: Tensor) -> None:
        """Add code indices of images that are not reconstructed: usage counts them, the image metrics do not.

        Training validation counts usage over the whole held-out set but decodes only its first images.

        Args:
            indices: Code indices, any shape with values in ``[0, K)``.
        """
        if self.usage is None:
            raise ValueError("count_codes needs the usage metric; add 'usage' to metrics=")
        self.usage.update(indices.to(self.device))

    def compute(self) -> tuple[dict[str, float], dict[str, str]]:
        """All figures over every rank's batches, and their definitions.

        Returns:
            ``(metrics, notes)``: metric name -> value (``num_images`` included), metric name -> definition.
        """
        sums = self._sums.clone()
        all_reduce_sum_(sums)
        n = float(sums[-1])
        if n == 0:
            raise ValueError("no image was evaluated (empty dataset or shard)")
        out: dict[str, float] = {}
        notes: dict[str, str] = {}
        for i, key in enumerate(self._keys):
            out[key] = float(sums[i]) if key == "exact_images" else float(sums[i]) / n
        if "psnr" in self.metrics:
            out["psnr"] = out[f"psnr_{self.psnr_channel}"]
            cap = f"; an exact reconstruction (infinite PSNR) counts as {PSNR_CAP:g} dB"
            notes["psnr"] = f"the {self.psnr_channel.upper()} PSNR below (psnr_channel={self.psnr_channel!r})"
            notes["psnr_rgb"] = (
                "10 log10(1 / MSE) over the 3 channels of the 8-bit images in [0, 1], mean over "
                f"images (LlamaGen's PSNR){cap}"
            )
            notes["psnr_y"] = (
                "10 log10(255^2 / MSE) on the BT.601 luma Y = 16 + 65.481 R + 128.553 G + 24.966 B, "
                f"mean over images (FVQ's PSNR){cap}"
            )
            notes["exact_images"] = "images whose 8-bit reconstruction equals the original (PSNR infinite, capped)"
        if "ssim" in self.metrics:
            notes["ssim"] = (
                "SSIM of Wang et al. 2004 (Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03) on [0, 1] "
                "images with data range 1 (correct), mean over images"
            )
            notes["ssim_dr2"] = (
                "the published variant (LlamaGen, FVQ): skimage structural_similarity with "
                "data_range=2 on [0, 1] images (7x7 uniform window); inflated, only for comparison "
                "with their tables"
            )
        if "lpips_vgg" in self.metrics:
            notes["lpips_vgg"] = "LPIPS v0.1, VGG16 trunk (the training loss of LlamaGen/FVQ), mean over images"
        if "lpips_alex" in self.metrics:
            notes["lpips_alex"] = "LPIPS v0.1, AlexNet trunk (FVQ's reported LPIPS), mean over images"
        if "rfid" in self.metrics:
            rec = self.reconstruction_stats.all_reduce()
            if self._accumulate_reference:
                self.reference.stats.all_reduce()
            mu_ref, sigma_ref = self.reference.moments()
            if rec.count < 2:
                raise ValueError(f"rFID needs at least 2 images, got {rec.count}; evaluate more images or drop rfid")
            out["rfid"] = frechet_distance(mu_ref, sigma_ref, rec.mean(), rec.covariance())
            notes["rfid"] = (
                "Fréchet distance between FID-Inception pool features (TF inception-2015-12-05, TF1 bilinear "
                "resize to 299) of the 8-bit reconstructions and of the reference set: " + self.reference.description
            )
        if self.usage is not None:
            report = self.usage.compute()
            out.update(
                usage=report.usage,
                perplexity=report.perplexity,
                dead_codes=float(report.dead_codes),
                tokens=float(report.num_tokens),
            )
            per_code = report.num_tokens / report.codebook_size
            notes["usage"] = (
                f"fraction of the K = {report.codebook_size} codes used at least once over all tokens of the whole "
                "set (code histogram summed over all ranks; several codes per position pooled)"
            )
            if per_code < 16:
                notes["usage"] += (
                    f"; only {per_code:.1f} tokens per code: usage is limited by the size of the set, not only by "
                    "the codebook (use at least 16 tokens per code)"
                )
            notes["perplexity"] = "exp of the entropy of the same histogram (K when every code is equally used)"
            notes["dead_codes"] = "codes never used over the whole set (K - used)"
            notes["tokens"] = "code indices counted (all ranks)"
        out["num_images"] = n
        return out, notes


# ----------------------------------------------------------------------------------------------------------------
# data


@dataclass
class EvalData:
    """An evaluation dataset and how it was built.

    Attributes:
        dataset: Items are :class:`~fvq.data.images.ImageSample` (or image tensors), images ``(3, S, S)`` in [-1, 1].
        protocol: ``"llamagen"``, ``"fvq"``, ``"embedded"`` or ``"custom"``.
        protocol_description: The crop in words.
        description: The set in words (kind, path, size).
        image_size: S, when known.
    """

    dataset: Dataset
    protocol: str
    protocol_description: str
    description: str
    image_size: int | None


def _check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    return protocol


def _describe_dataset(dataset: Dataset, protocol: str) -> EvalData:
    """Protocol and description of a dataset object handed in directly."""
    from fvq.data.embedded import EmbeddedPhotos
    from fvq.data.transforms import EvalCrop

    if isinstance(dataset, EmbeddedPhotos):
        if dataset.split != "val":
            raise ValueError("evaluate the embedded set's held-out split: EmbeddedPhotos('val', ...), got 'train'")
        return EvalData(
            dataset,
            "embedded",
            _EMBEDDED_PROTOCOL,
            f"embedded held-out photos {list(dataset.photo_names)} ({len(dataset)} crops of {dataset.image_size} px)",
            dataset.image_size,
        )
    transform = getattr(dataset, "transform", None)
    where = getattr(dataset, "root", None) or getattr(dataset, "shards", None)
    kind = type(dataset).__name__
    if isinstance(where, list):
        where = f"{len(where)} shards from {where[0]}" if where else "no shards"
    if isinstance(transform, EvalCrop):
        if transform.protocol != protocol:
            raise ValueError(
                f"the dataset crops with the {transform.protocol!r} protocol but protocol={protocol!r} was asked for; "
                "build the dataset with the matching eval_crop (or pass a data config and let evaluate() build it)"
            )
        size = f"{len(dataset)} images" if hasattr(dataset, "__len__") else "streamed"
        return EvalData(dataset, protocol, PROTOCOLS[protocol], f"{kind} {where} ({size})", transform.size)
    return EvalData(
        dataset,
        "custom",
        f"as the dataset yields its images (transform {transform!r}); the {protocol!r} crop was not applied by fvq",
        f"{kind}{f' {where}' if where else ''}",
        None,
    )


def build_eval_dataset(
    data: Dataset | Mapping[str, Any],
    *,
    protocol: Protocol = "llamagen",
    image_size: int | None = None,
    num_images: int | None = None,
) -> EvalData:
    """The evaluation dataset of ``data``, cropped by ``protocol``.

    Args:
        data: A dataset object (used as it is; an :class:`~fvq.data.transforms.EvalCrop` transform must match
            ``protocol``), or a data config for :func:`fvq.data.build_dataset` (its ``"val"`` split is built with
            ``eval_crop=protocol``; ``{"type": "embedded"}`` gives the embedded held-out photos, whose own fixed
            crops ignore ``protocol``).
        protocol: ``"llamagen"`` or ``"fvq"`` (see :data:`PROTOCOLS`).
        image_size: S (overrides the config's ``image_size``; default: the config's, else 256).
        num_images: For the embedded set, the number of held-out crops to make (at least).

    Returns:
        An :class:`EvalData`.
    """
    from fvq.data.build import build_dataset

    _check_protocol(protocol)
    if isinstance(data, Dataset):
        return _describe_dataset(data, protocol)
    if not isinstance(data, Mapping):
        raise TypeError(f"data must be a torch Dataset or a data config mapping, got {type(data).__name__}")
    config = dict(data)
    kind = config.get("type", "embedded")
    if image_size is not None:
        config["image_size"] = int(image_size)
    config.setdefault("image_size", 256)
    if kind == "embedded":
        if num_images is not None:
            config["val_samples"] = max(int(num_images), int(config.get("val_samples", 0)))
        dataset = build_dataset(config, "val")
        return _describe_dataset(dataset, protocol)
    if config.get("eval_crop", protocol) != protocol:
        raise ValueError(
            f"data config eval_crop={config['eval_crop']!r} contradicts protocol={protocol!r}; give one of them"
        )
    config["eval_crop"] = protocol
    dataset = build_dataset(config, "val")
    where = config.get("val_path") or config.get("path")
    size = f"{len(dataset)} images" if not isinstance(dataset, IterableDataset) else "streamed"
    return EvalData(dataset, protocol, PROTOCOLS[protocol], f"{kind} {where} ({size})", int(config["image_size"]))


class _Take(IterableDataset):
    """The first ``n`` items of an iterable dataset (this rank's stream)."""

    def __init__(self, dataset: IterableDataset, n: int) -> None:
        self.dataset, self.n = dataset, n

    def __iter__(self):
        for i, item in enumerate(self.dataset):
            if i >= self.n:
                return
            yield item


def _shard(dataset: Dataset, num_images: int | None) -> tuple[Dataset, int | None, int | None]:
    """This rank's share: ``(dataset, images on this rank or None, images over all ranks or None)``.

    Map-style: rank r takes items ``r, r + W, r + 2W, ...`` of the first ``num_images`` (no padding, no duplicate).
    Iterable (tar shards): the dataset splits its stream across ranks itself; ``num_images`` is cut into per-rank
    shares (``num_images // W``, one more for the first ``num_images % W`` ranks).
    """
    rank, world = placement()
    if isinstance(dataset, IterableDataset):
        if num_images is None:
            return dataset, None, None
        share = num_images // world + (1 if rank < num_images % world else 0)
        return _Take(dataset, share), share, num_images
    total = len(dataset)  # type: ignore[arg-type]
    if total == 0:
        raise ValueError("the evaluation dataset is empty")
    if num_images is not None:
        if num_images > total:
            raise ValueError(f"num_images={num_images} but the dataset holds only {total} images")
        total = num_images
    indices = list(range(rank, total, world))
    return Subset(dataset, indices), len(indices), total


# ----------------------------------------------------------------------------------------------------------------
# reference statistics files


def _reference_metadata(inception_protocol: str, data: EvalData, total: int | None) -> dict[str, str]:
    return {
        "format": _STATS_FORMAT,
        "protocol": inception_protocol,
        "eval_protocol": data.protocol,
        "image_size": str(data.image_size),
        "dataset": data.description,
        "num_images": str(total) if total is not None else "",
        "name": f"originals of {data.description}, {data.protocol} crop, S = {data.image_size}",
    }


def _feature_dim(networks: EvalNetworks) -> int:
    """Feature dimension of the FID network (2048 for the FID Inception)."""
    return int(getattr(networks.inception, "feature_dim", _FEATURE_DIM))


def _load_reference(path: Path, expected: dict[str, str], dim: int = _FEATURE_DIM) -> _Reference:
    """Reference statistics from ``path``: an fvq ``.safetensors`` (checked against ``expected``) or an ``.npz``
    with ``mu`` ``(dim,)`` and ``sigma`` ``(dim, dim)`` (ADM / pytorch-fid style; its preprocessing is the file
    maker's responsibility)."""
    if path.suffix == ".npz":
        with np.load(path) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path} must hold arrays 'mu' ({dim},) and 'sigma' ({dim}, {dim}); got {list(f)}")
            mu, sigma = torch.from_numpy(f["mu"]).double(), torch.from_numpy(f["sigma"]).double()
        if mu.shape != (dim,) or sigma.shape != (dim, dim):
            raise ValueError(
                f"{path}: expected mu ({dim},) and sigma ({dim}, {dim}), got {tuple(mu.shape)}, {tuple(sigma.shape)}"
            )
        return _Reference(
            f"precomputed mu/sigma from {path} (made outside fvq: same Inception and preprocessing assumed)",
            mu=mu,
            sigma=sigma,
        )
    stats = FeatureStats.load(path)
    if stats.dim != dim:
        raise ValueError(f"reference statistics {path} hold {stats.dim}-d features, the FID network gives {dim}-d")
    meta = stats.metadata
    if meta.get("protocol") and meta["protocol"] != expected["protocol"]:
        raise ValueError(
            f"reference statistics {path} were computed with Inception protocol {meta['protocol']!r}, this run uses "
            f"{expected['protocol']!r}; delete the file or give another --reference-stats path"
        )
    if meta.get("format") == _STATS_FORMAT:
        for key in ("eval_protocol", "image_size", "dataset", "num_images"):
            if meta.get(key) != expected[key]:
                raise ValueError(
                    f"reference statistics {path} were made for {key} = {meta.get(key)!r}, this evaluation has "
                    f"{expected[key]!r}; delete the file (it is rebuilt) or give another --reference-stats path"
                )
    name = meta.get("name") or "statistics made outside fvq eval"
    return _Reference(f"{name} ({stats.count} images, cached in {path})", stats=stats)


# ----------------------------------------------------------------------------------------------------------------
# the entry point


@torch.inference_mode()
def evaluate(
    tokenizer: nn.Module,
    data: Dataset | Mapping[str, Any],
    *,
    protocol: Protocol = "llamagen",
    image_size: int | None = None,
    num_images: int | None = None,
    batch_size: int = 32,
    metrics: Sequence[str] = DEFAULT_METRICS,
    reference_stats: str | Path | FeatureStats | None = None,
    psnr_channel: Literal["rgb", "y"] = "rgb",
    device: torch.device | str | None = None,
    networks: EvalNetworks | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> EvalResult:
    """Reconstruct every image of a set once and compute rFID, LPIPS (VGG, AlexNet), PSNR, SSIM and codebook usage.

    Under ``torch.distributed`` (initialised by the caller, e.g. ``fvq eval`` under ``torchrun``) each rank
    reconstructs a disjoint share and every statistic is summed over ranks; every rank gets the same result.

    Args:
        tokenizer: A :class:`~fvq.models.tokenizer.Tokenizer` (or any module whose ``forward(images)`` returns an
            object with ``reconstruction`` ``(B, 3, H, W)`` and ``quantizer.indices``, and with ``codebook_size``);
            put in eval mode here.
        data: A dataset, or a data config (``{"type": "folder", "val_path": ...}``, ``{"type": "embedded"}``, ...)
            built by :func:`build_eval_dataset` with the protocol's crop.
        protocol: ``"llamagen"`` (short side resized to S, centre crop) or ``"fvq"`` (centre crop of the raw image).
        image_size: S for a data config (default: the config's ``image_size``, else 256).
        num_images: Evaluate only the first N images (default: all).
        batch_size: Images per forward pass on each rank.
        metrics: Metric groups, a subset of :data:`METRICS`.
        reference_stats: rFID reference: ``None`` (the originals' features, computed alongside), a
            :class:`~fvq.evaluation.fid.FeatureStats`, or a file path: an existing ``.safetensors`` written by an
            earlier evaluation of the same set is loaded (and checked), a missing one is computed now and written;
            an ``.npz`` with ``mu`` / ``sigma`` (ADM's reference batches) is used as it is.
        psnr_channel: The channel ``psnr`` reports (``"rgb"`` or ``"y"``; both are always in the result).
        device: Where to compute (default: CUDA when available, else CPU).
        networks: Preloaded :class:`EvalNetworks` (default: loaded from local files).
        num_workers: DataLoader workers.
        progress: Show a progress bar (rank 0) with the rate and the remaining time.

    Returns:
        An :class:`EvalResult`.
    """
    wanted = _check_metrics(metrics)
    _check_protocol(protocol)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_images is not None and num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if psnr_channel not in ("rgb", "y"):
        raise ValueError(f"psnr_channel must be 'rgb' or 'y', got {psnr_channel!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = placement()

    data_info = build_eval_dataset(data, protocol=protocol, image_size=image_size, num_images=num_images)
    shard, local_count, total = _shard(data_info.dataset, num_images)
    if "rfid" in wanted and total is not None and total < 2:
        raise ValueError(f"rFID needs at least 2 images, the set has {total}; evaluate more images or drop rfid")
    if data_info.image_size is not None and "lpips_alex" in wanted and data_info.image_size < 31:
        raise ValueError(f"LPIPS AlexNet needs images of at least 31 px, got {data_info.image_size}; drop lpips_alex")

    networks = networks if networks is not None else load_eval_networks(wanted, device)
    reference: _Reference | None = None
    save_reference_to: Path | None = None
    expected_meta: dict[str, str] = {}
    if "rfid" in wanted:
        expected_meta = _reference_metadata(networks.inception.protocol, data_info, total)
        if isinstance(reference_stats, FeatureStats):
            name = reference_stats.metadata.get("name", "given FeatureStats")
            reference = _Reference(f"{name} ({reference_stats.count} images)", stats=reference_stats)
        elif reference_stats is not None:
            path = Path(reference_stats)
            if path.is_file():
                reference = _load_reference(path, expected_meta, _feature_dim(networks))
            elif path.suffix == ".npz":
                raise FileNotFoundError(f"reference statistics {path} do not exist (an .npz is only read, never made)")
            else:
                save_reference_to = path
    codebook_size = getattr(tokenizer, "codebook_size", None) if "usage" in wanted else None
    evaluator = ReconstructionEvaluator(
        codebook_size=codebook_size,
        metrics=wanted,
        networks=networks,
        psnr_channel=psnr_channel,
        reference=reference,
        reference_description=(
            "the originals of the evaluated set (same images, same crop), computed in this evaluation"
            + (f" and cached in {save_reference_to}" if save_reference_to else "")
        ),
        device=device,
    )

    tokenizer.eval()
    tokenizer.to(device)
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=False)
    seen_size: int | None = None
    start = time.perf_counter()
    bar = tqdm(total=local_count, desc="eval", unit="img", disable=not progress or rank != 0, dynamic_ncols=True)
    with bar:
        for batch in loader:
            images = batch_images(batch).to(device)  # (B, 3, S, S) in [-1, 1]
            if seen_size is None:
                seen_size = int(images.shape[-1])
            out = tokenizer(images)
            evaluator.update(images, out.reconstruction, out.quantizer.indices if "usage" in wanted else None)
            bar.update(images.shape[0])
    result_metrics, notes = evaluator.compute()
    seconds = time.perf_counter() - start

    if save_reference_to is not None and evaluator.reference is not None:
        stats = evaluator.reference.stats
        stats.metadata.update(expected_meta)
        if rank == 0:
            stats.save(save_reference_to)
    n = int(result_metrics["num_images"])
    if total is not None and n != total:
        notes["num_images"] = f"asked for {total} images, the set gave {n}"
    return EvalResult(
        metrics=result_metrics,
        protocol=data_info.protocol,
        protocol_description=data_info.protocol_description,
        reference=evaluator.reference.description if evaluator.reference is not None else "",
        dataset=data_info.description,
        image_size=int(data_info.image_size or seen_size or 0),
        num_images=n,
        notes=notes,
        info={
            "world_size": world,
            "device": str(device),
            "batch_size_per_rank": batch_size,
            "seconds": round(seconds, 3),
            "images_per_second": round(n / seconds, 3) if seconds > 0 else None,
            "codebook_size": codebook_size,
            "inception_protocol": networks.inception.protocol if networks.inception is not None else None,
            "uint8": "originals and reconstructions rounded to 8 bits (floor(255 x + 0.5)) before every metric, as "
            "the published protocols score saved PNG files",
        },
    )
