"""Figures of a training run, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Each helper takes the records of ``log.jsonl`` (:func:`fvq.training.logging.read_log`) or a code histogram and returns
a :class:`matplotlib.figure.Figure`; :func:`figure_png` renders one to PNG bytes (and optionally a file). They are the
figures of ``fvq report`` and can be used on their own, e.g. in a notebook.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from fvq.quantizers.usage import usage_and_perplexity

# generator loss terms of ``TokenizerLoss`` (logged as ``train/<name>``), drawn on one log-scale panel
LOSS_TERMS: tuple[tuple[str, str], ...] = (
    ("train/loss", "total"),
    ("train/reconstruction", "reconstruction"),
    ("train/perceptual", "perceptual (LPIPS)"),
    ("train/quantizer", "quantizer"),
)
# adversarial terms (generator and discriminator), drawn on their own panel when the GAN was active
GAN_TERMS: tuple[tuple[str, str], ...] = (
    ("train/adversarial", "generator (adversarial)"),
    ("discriminator/loss", "discriminator"),
)

_BATCH_STYLE = dict(color="#4C72B0", linewidth=1.2, alpha=0.85)
_HELD_OUT_STYLE = dict(color="#DD8452", linewidth=1.6, marker="o", markersize=5)
_PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


def series(records: Iterable[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``(steps, values)`` of ``key`` over the records that hold a finite value for it.

    Args:
        records: Log records, each a dict with ``step`` and scalars (``None`` marks a non-finite value).
        key: Scalar name, e.g. ``"train/loss"`` or ``"val/usage"``.

    Returns:
        Two 1-D arrays of equal length ``(T,)``: int64 steps and float64 values, in log order.
    """
    steps: list[int] = []
    values: list[float] = []
    for record in records:
        value = record.get(key)
        if value is None or "step" not in record:
            continue
        value = float(value)
        if math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(value)
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def _style_axes(ax: Any, title: str, ylabel: str | None = None) -> None:
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="major", color="#e3e3e3", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777777")
    ax.set_xticks([])
    ax.set_yticks([])


def _all_positive(values: Sequence[np.ndarray]) -> bool:
    return all(v.size == 0 or bool((v > 0).all()) for v in values) and any(v.size for v in values)


def training_curves_figure(records: Sequence[dict[str, Any]]) -> Figure:
    """Loss curves and the learning rate over training.

    Panels: the generator's loss terms (total, reconstruction, perceptual, quantizer; log scale when all positive),
    the adversarial terms when the GAN was active at some step, and the learning rate (``train/lr``, with the
    annealing factor ``train/lr_factor`` on the right axis).

    Args:
        records: Records of ``log.jsonl``.

    Returns:
        A figure about 12 x 3.6 inches.
    """
    gan = [(key, label) for key, label in GAN_TERMS if np.any(series(records, key)[1] != 0)]
    widths = [2.0, 1.4, 1.4] if gan else [2.0, 1.4]
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, len(widths), gridspec_kw={"width_ratios": widths})

    ax = axes[0]
    drawn = []
    for (key, label), color in zip(LOSS_TERMS, _PALETTE):
        steps, values = series(records, key)
        if steps.size:
            ax.plot(steps, values, label=label, color=color, linewidth=1.4 if key == "train/loss" else 1.1)
            drawn.append(values)
    _style_axes(ax, "Generator loss", "loss")
    if drawn:
        if _all_positive(drawn):
            ax.set_yscale("log")
        ax.legend(frameon=False, fontsize=9)
    else:
        _no_data(ax, "no training loss logged")

    if gan:
        ax = axes[1]
        for (key, label), color in zip(gan, _PALETTE[2:]):
            ax.plot(*series(records, key), label=label, color=color, linewidth=1.1)
        _style_axes(ax, "Adversarial loss", "loss")
        ax.legend(frameon=False, fontsize=9)

    ax = axes[-1]
    steps, lr = series(records, "train/lr")
    _style_axes(ax, "Learning rate", "lr")
    if steps.size:
        ax.plot(steps, lr, color="#55A868", linewidth=1.4)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.3g}"))  # no detached "1e-5" offset text
        f_steps, factor = series(records, "train/lr_factor")
        peak_lr, peak_factor = float(lr.max()), float(factor.max()) if factor.size else 0.0
        if peak_lr > 0 and peak_factor > 0:  # lr = base_lr * factor: the factor is a rescaled right axis
            base = peak_lr / peak_factor
            right = ax.secondary_yaxis("right", functions=(lambda x: x / base, lambda f: f * base))
            right.set_ylabel("annealing factor")
            ax.spines["right"].set_visible(False)
    else:
        _no_data(ax, "no learning rate logged")
    return fig


def usage_figure(records: Sequence[dict[str, Any]], codebook_size: int | None = None) -> Figure:
    """Codebook usage and perplexity over training: per training batch and over the held-out set.

    Batch figures (``quantizer/usage``, ``quantizer/perplexity``) count the codes of one training batch, so they are
    bounded by the batch's token count; held-out figures (``val/usage``, ``val/perplexity``) count the whole
    held-out set. With ``codebook_size`` the perplexity panel marks K, the perplexity of perfectly uniform use.

    Args:
        records: Records of ``log.jsonl``.
        codebook_size: K, or None when unknown.

    Returns:
        A figure about 12 x 3.6 inches.
    """
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax_usage, ax_ppl = fig.subplots(1, 2)
    for ax, name, title in ((ax_usage, "usage", "Codebook usage"), (ax_ppl, "perplexity", "Code perplexity")):
        b_steps, batch = series(records, f"quantizer/{name}")
        v_steps, held_out = series(records, f"val/{name}")
        _style_axes(ax, title, "fraction of codes used" if name == "usage" else "perplexity")
        if not b_steps.size and not v_steps.size:
            _no_data(ax, f"no {name} logged")
            continue
        if b_steps.size:
            ax.plot(b_steps, batch, label="training batch", **_BATCH_STYLE)
        if v_steps.size:
            ax.plot(v_steps, held_out, label="held-out set", **_HELD_OUT_STYLE)
        if name == "usage":
            peak = max(float(batch.max()) if batch.size else 0.0, float(held_out.max()) if held_out.size else 0.0)
            # the full 0-100 % range once usage is substantial; zoomed in while the codebook is still collapsed
            ax.set_ylim(0, 1.02 if peak >= 0.2 else max(peak * 1.25, 1e-3))
            spec = ".0%" if peak >= 0.2 else ".2%"
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _, spec=spec: format(y, spec)))
        else:
            ax.set_yscale("log")  # perplexity spans 1 (collapse) to K (uniform use)
            if codebook_size:
                ax.axhline(
                    codebook_size, color="#999999", linestyle="--", linewidth=1.0, label=f"K = {codebook_size:,}"
                )
        ax.legend(frameon=False, fontsize=9, loc="lower right" if name == "usage" else "best")
    return fig


def code_frequency_figure(counts: torch.Tensor | np.ndarray, title: str = "Held-out code frequencies") -> Figure:
    """The rank-ordered code-frequency histogram (log scale) with the uniform level and the dead codes marked.

    Codes are sorted from most to least used; the y axis is each code's share of all tokens. The dashed line is
    ``1 / K`` (every code used equally often); codes never used (dead) have no bar on a log scale, so their ranks
    are shaded and counted.

    Args:
        counts: ``(K,)`` non-negative integer code counts (e.g. ``val_code_counts.pt``).
        title: Panel title.

    Returns:
        A figure about 12 x 3.8 inches.
    """
    counts = torch.as_tensor(counts).detach().cpu()
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"expected a 1-D code histogram (K,), got shape {tuple(counts.shape)}")
    if counts.is_floating_point() or counts.is_complex() or bool((counts < 0).any()):
        raise ValueError(f"expected non-negative integer code counts, got dtype {counts.dtype}")
    k = counts.numel()
    total = int(counts.sum())
    if total == 0:
        raise ValueError(f"the code histogram is empty (all {k} counts are 0)")
    freq = np.sort(counts.double().numpy())[::-1] / total  # (K,), most used first
    used = int((freq > 0).sum())
    dead = k - used
    p = freq[:used]
    perplexity = float(usage_and_perplexity(counts)[1])

    fig = Figure(figsize=(12, 3.4), layout="constrained")
    ax = fig.subplots()
    ranks = np.arange(1, k + 1)
    ax.fill_between(ranks[:used], freq[:used], 1e-300, step="mid", color="#4C72B0", alpha=0.35, linewidth=0)
    ax.step(ranks[:used], freq[:used], where="mid", color="#4C72B0", linewidth=1.2, label="code frequency")
    ax.axhline(1.0 / k, color="#C44E52", linestyle="--", linewidth=1.2, label=f"uniform 1/K = {1.0 / k:.2e}")
    ax.set_yscale("log")
    low = min(float(p.min()), 1.0 / k) / 3
    ax.set_ylim(low, min(1.0, float(p.max()) * 3))
    ax.set_xlim(0.5, k + 0.5)
    if dead:
        ax.axvspan(used + 0.5, k + 0.5, color="#999999", alpha=0.18, linewidth=0)
        ax.text(
            (used + k) / 2 + 0.5,
            np.sqrt(low * 1.0 / k),
            f"{dead:,} dead codes\n({dead / k:.1%})",
            ha="center",
            va="center",
            fontsize=9,
            color="#444444",
        )
    _style_axes(ax, title, "share of tokens")
    ax.set_xlabel("code rank (most used first)")
    ax.legend(frameon=False, fontsize=9, loc="upper right")
    ax.set_title(
        f"K = {k:,}  ·  used {used:,} ({used / k:.1%})  ·  dead {dead:,}  ·  perplexity {perplexity:,.1f} "
        f"({perplexity / k:.1%} of K)  ·  {total:,} tokens",
        fontsize=9,
        loc="right",
        color="#444444",
    )
    return fig


def figure_png(fig: Figure, path: str | Path | None = None, dpi: int = 110) -> bytes:
    """Render a figure to PNG bytes (white background); also write them to ``path`` when given.

    Args:
        fig: The figure.
        path: Optional output file (parent folders are created).
        dpi: Resolution.

    Returns:
        The PNG file's bytes.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    data = buffer.getvalue()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data
