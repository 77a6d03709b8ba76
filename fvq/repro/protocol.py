"""The one evaluation protocol of every reproduction run.

Held-out set: the run's validation data (for the CPU suite, fixed crops of the embedded photos that training never
sees). On it, with the trained model in its inference form (projector folded into the codebook):

* codebook usage over the whole set, with at least ``min_tokens_per_code`` tokens per code (64 by default): with fewer,
  usage is capped by the size of the set rather than by the codebook, so a set too small for K is refused before any
  training starts;
* the curve of usage against the number of held-out tokens counted (exact: the first position of each code in the
  token stream), which shows whether usage has saturated;
* perplexity (``exp`` of the entropy of the code histogram), dead codes, distinct code vectors;
* how many codes dead-code restarts overwrote during training (``None`` when the quantizer has no restarts):
  restarts keep usage high by construction, so usage must be read beside this count;
* PSNR (8-bit RGB, and Y as FVQ reports it) and LPIPS (AlexNet, the paper's) on the first ``image_metric_images``
  held-out crops;
* the wall time of the evaluation.

Several codes per position (residual, multi-scale) are pooled into one histogram.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from fvq.data.images import batch_images

# positions are counted in int64; "not seen" is larger than any position
_NOT_SEEN = torch.iinfo(torch.int64).max


@dataclass(frozen=True)
class Protocol:
    """Settings of the protocol; an experiment file may override them under ``protocol:``.

    Attributes:
        min_tokens_per_code: Held-out tokens per code the set must hold (64). Lower it only for tests.
        image_metric_images: PSNR and LPIPS over the first this many held-out images (all when larger).
        lpips_net: LPIPS trunk, ``"alex"`` (the paper's LPIPS) or ``"vgg"``.
        batch_size: Held-out images per forward pass.
        curve_points: Points of the usage-against-tokens curve (geometric spacing, the last at the whole set).
    """

    min_tokens_per_code: int = 64
    image_metric_images: int = 1024
    lpips_net: str = "alex"
    batch_size: int = 256
    curve_points: int = 16
    heldout_samples: int | None = None

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any] | None) -> Protocol:
        overrides = dict(overrides or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(f"unknown protocol keys {unknown}; expected a subset of {valid}")
        protocol = cls(**overrides)
        if protocol.min_tokens_per_code < 1:
            raise ValueError(f"min_tokens_per_code must be >= 1, got {protocol.min_tokens_per_code}")
        if protocol.heldout_samples is not None and protocol.heldout_samples < 1:
            raise ValueError(f"heldout_samples must be >= 1, got {protocol.heldout_samples}")
        if protocol.lpips_net not in ("alex", "vgg"):
            raise ValueError(f"lpips_net must be 'alex' or 'vgg', got {protocol.lpips_net!r}")
        return protocol

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def heldout_data(val_data: dict[str, Any], protocol: Protocol) -> dict[str, Any]:
    """The dataset config of the protocol's held-out set: the run's validation data, resized to
    ``protocol.heldout_samples`` images when that is set."""
    from fvq.data.build import DATASET_TYPES

    data = dict(val_data)
    if protocol.heldout_samples is None:
        return data
    kind = data.get("type", "embedded")
    if "val_samples" not in DATASET_TYPES.get(kind, ()):
        raise ValueError(
            f"protocol.heldout_samples needs validation data that takes val_samples (e.g. embedded), got {kind!r}; "
            "leave heldout_samples out to use the run's validation set as it is"
        )
    data["val_samples"] = int(protocol.heldout_samples)
    return data


class HeldOutTooSmallError(ValueError):
    """The held-out set holds fewer tokens per code than the protocol needs."""


@torch.no_grad()
def tokens_per_image(tokenizer: nn.Module, image_size: int) -> int:
    """Code indices one ``image_size`` x ``image_size`` image gives (all codes per position counted)."""
    was_training = tokenizer.training
    tokenizer.eval()
    probe = torch.zeros(1, 3, image_size, image_size, device=next(tokenizer.parameters()).device)
    count = int(tokenizer.encode(probe).numel())
    tokenizer.train(was_training)
    return count


def required_images(codebook_size: int, per_image: int, protocol: Protocol) -> int:
    """Held-out images needed for ``protocol.min_tokens_per_code`` tokens per code."""
    return math.ceil(protocol.min_tokens_per_code * codebook_size / per_image)


def check_heldout(num_images: int, per_image: int, codebook_size: int, protocol: Protocol) -> None:
    """Refuse a held-out set with fewer than ``protocol.min_tokens_per_code`` tokens per code.

    Raises:
        HeldOutTooSmallError: with the number of images that would suffice.
    """
    tokens = num_images * per_image
    if tokens < protocol.min_tokens_per_code * codebook_size:
        need = required_images(codebook_size, per_image, protocol)
        raise HeldOutTooSmallError(
            f"the held-out set is too small for K = {codebook_size}: {num_images} images x {per_image} tokens = "
            f"{tokens} tokens, {tokens / codebook_size:.1f} per code; the protocol needs at least "
            f"{protocol.min_tokens_per_code} per code, i.e. {need} images (set data.val_samples >= {need})"
        )


def restarted_codes(quantizer: nn.Module) -> int | None:
    """Codes overwritten by dead-code restarts during training (sum over the quantizer's restarters, each counted
    once), or ``None`` when no part of the quantizer restarts codes."""
    counters = [buf for name, buf in quantizer.named_buffers() if name.split(".")[-1] == "restarted_total"]
    return int(sum(int(c) for c in counters)) if counters else None


def usage_curve(first_seen: Tensor, total_tokens: int, codebook_size: int, points: int) -> dict[str, list[float]]:
    """Usage after the first ``n`` held-out tokens, at ``points`` geometrically spaced ``n`` up to the whole set.

    Args:
        first_seen: ``(K,)`` int64, the stream position of each code's first occurrence (``_NOT_SEEN`` if never).
        total_tokens: Tokens in the stream.
        codebook_size: K.
        points: Number of points.
    """
    if total_tokens < 1:
        return {"tokens": [], "tokens_per_code": [], "usage": []}
    start = max(1.0, codebook_size / 64)  # from 1/64 token per code
    if points < 2 or start >= total_tokens:
        marks = [total_tokens]
    else:
        ratio = (total_tokens / start) ** (1 / (points - 1))
        marks = sorted({min(total_tokens, int(round(start * ratio**i))) for i in range(points)} | {total_tokens})
    seen = first_seen[first_seen != _NOT_SEEN].sort().values  # (used,)
    used = torch.searchsorted(seen, torch.tensor(marks, dtype=torch.int64), right=False)  # codes first seen before n
    return {
        "tokens": [float(n) for n in marks],
        "tokens_per_code": [n / codebook_size for n in marks],
        "usage": [float(u) / codebook_size for u in used.tolist()],
    }


@dataclass
class ProtocolResult:
    """What the protocol measures on one trained model (see the module docstring).

    Attributes:
        usage, perplexity, dead_codes, distinct_codes: Held-out codebook figures (``distinct_codes``: different
            vectors in the searched codebook, an upper bound of the codes that can be used).
        codebook_size: K.
        tokens, images, tokens_per_image, tokens_per_code: The held-out set's size.
        restarted_codes: Codes overwritten by dead-code restarts during training, or ``None`` without restarts.
        psnr, psnr_y, lpips: Image metrics over ``image_metric_images`` held-out images.
        usage_curve: ``{"tokens", "tokens_per_code", "usage"}`` lists: usage after the first ``n`` tokens.
        eval_seconds: Wall time of the evaluation.
        definitions: Metric name -> its definition.
    """

    usage: float
    perplexity: float
    dead_codes: int
    distinct_codes: int | None
    codebook_size: int
    tokens: int
    images: int
    tokens_per_image: int
    tokens_per_code: float
    restarted_codes: int | None
    psnr: float
    psnr_y: float
    lpips: float
    lpips_net: str
    image_metric_images: int
    usage_curve: dict[str, list[float]]
    eval_seconds: float
    definitions: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def evaluate_heldout(
    tokenizer: nn.Module,
    val_set: torch.utils.data.Dataset,
    protocol: Protocol,
    *,
    restarted: int | None = None,
    device: torch.device | str = "cpu",
) -> ProtocolResult:
    """Run the protocol on a trained tokenizer.

    Args:
        tokenizer: The model in its inference form (``Tokenizer.export()``), any device.
        val_set: The held-out images (items ``(3, H, W)`` in ``[-1, 1]`` or dicts with ``image``).
        protocol: The settings.
        restarted: Codes the training quantizer's restarts overwrote (:func:`restarted_codes`), or ``None``.
        device: Where to evaluate.

    Raises:
        HeldOutTooSmallError: before any work, when the set is too small for K.
    """
    from fvq.evaluation.evaluate import ReconstructionEvaluator, load_eval_networks
    from fvq.training.tokenizer_task import distinct_code_metrics

    t0 = time.time()
    device = torch.device(device)
    model = tokenizer.to(device).eval()
    k = int(model.codebook_size)
    first = batch_images(torch.utils.data.default_collate([val_set[0]]))  # (1, 3, H, W)
    per_image = tokens_per_image(model, int(first.shape[-1]))
    check_heldout(len(val_set), per_image, k, protocol)

    lpips_key = f"lpips_{protocol.lpips_net}"
    evaluator = ReconstructionEvaluator(
        codebook_size=k,
        metrics=("psnr", "usage", lpips_key),
        networks=load_eval_networks([lpips_key], device),
        device=device,
    )
    first_seen = torch.full((k,), _NOT_SEEN, dtype=torch.int64, device=device)  # (K,)
    position = 0  # tokens of the stream so far
    images_seen = 0
    loader = torch.utils.data.DataLoader(val_set, batch_size=protocol.batch_size, shuffle=False)
    for batch in loader:
        images = batch_images(batch).to(device)  # (B, 3, H, W)
        out = model.quantizer(model.encode_latents(images))  # indices (B, ...)
        indices = out.indices
        decoded = max(0, min(images.shape[0], protocol.image_metric_images - images_seen))
        if decoded:
            recon = model.decode_latents(out.quantized[:decoded]).float()  # (b, 3, H, W)
            evaluator.update(images[:decoded], recon, indices[:decoded])
        if decoded < images.shape[0]:
            evaluator.count_codes(indices[decoded:])
        flat = indices.reshape(-1).to(device)  # (B * tokens per image,), image after image
        positions = torch.arange(position, position + flat.numel(), device=device)
        first_seen.scatter_reduce_(0, flat, positions, reduce="amin")
        position += flat.numel()
        images_seen += images.shape[0]

    figures, notes = evaluator.compute()
    distinct = distinct_code_metrics(model.quantizer).get("val/distinct_codes")
    definitions = {
        "usage": notes["usage"],
        "perplexity": notes["perplexity"],
        "dead_codes": notes["dead_codes"],
        "psnr": notes["psnr_rgb"],
        "psnr_y": notes["psnr_y"],
        "lpips": notes[lpips_key],
        "restarted_codes": "codes overwritten by dead-code restarts over the whole training (restarted_total of "
        "every restarter of the quantizer); null when the quantizer has no restarts",
        "usage_curve": "usage after the first n held-out tokens, in the set's fixed order (exact, from each code's "
        "first occurrence)",
        "distinct_codes": "different vectors in the searched (mapped) codebook",
    }
    return ProtocolResult(
        usage=figures["usage"],
        perplexity=figures["perplexity"],
        dead_codes=int(figures["dead_codes"]),
        distinct_codes=None if distinct is None else int(distinct),
        codebook_size=k,
        tokens=int(figures["tokens"]),
        images=images_seen,
        tokens_per_image=per_image,
        tokens_per_code=figures["tokens"] / k,
        restarted_codes=restarted,
        psnr=figures["psnr_rgb"],
        psnr_y=figures["psnr_y"],
        lpips=figures[lpips_key],
        lpips_net=protocol.lpips_net,
        image_metric_images=int(figures["num_images"]),
        usage_curve=usage_curve(first_seen.cpu(), position, k, protocol.curve_points),
        eval_seconds=time.time() - t0,
        definitions=definitions,
    )
