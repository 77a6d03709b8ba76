"""The one contract every fvq quantizer follows.

A quantizer maps continuous features to discrete indices and back:

* ``forward(z) -> QuantizerOutput`` in training and evaluation,
* ``encode(z) -> indices`` and ``decode(indices) -> quantized``, which in eval mode satisfy
  ``decode(encode(z)) == forward(z).quantized`` exactly.

Inputs are feature maps ``(B, D, H, W)`` or vectors ``(N, D)``. Indices have the input's shape without the channel
axis, ``(B, H, W)`` or ``(N,)``; quantizers that emit several codes per position (residual, grouped) add a trailing
axis of length ``codes_per_position``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

_CHECK_VALUES: ContextVar[bool] = ContextVar("fvq_check_values", default=True)


@contextlib.contextmanager
def trusted_values() -> Iterator[None]:
    """Within the block, inputs are not scanned for NaN or inf (shapes and dtypes still are checked).

    The scan reads a value on the host, which on a GPU waits for every queued kernel. The training engine runs its
    steps inside this block: a non-finite input there shows as a non-finite loss, which its guard skips. Everywhere
    else (the public encode/decode boundary) inputs are scanned and refused with a clear message.
    """
    token = _CHECK_VALUES.set(False)
    try:
        yield
    finally:
        _CHECK_VALUES.reset(token)


def values_checked() -> bool:
    """False inside :func:`trusted_values`."""
    return _CHECK_VALUES.get()


@dataclass
class QuantizerOutput:
    """Result of a quantizer's forward pass.

    Attributes:
        quantized: Quantized features with straight-through gradients, same shape as the input
            (``(B, D, H, W)`` or ``(N, D)``).
        indices: Code ids, int64, shape ``(B, H, W)`` or ``(N,)`` (plus a trailing axis for multi-code quantizers).
        loss: Weighted sum of all terms in ``losses``; a scalar.
        losses: Named, *unweighted* loss terms (e.g. ``codebook``, ``commitment``, ``entropy``), scalars.
        metrics: Detached statistics of this batch (e.g. ``usage``, ``perplexity``), scalars.
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, Tensor] = field(default_factory=dict)


def channels_last_flat(z: Tensor, dim: int, name: str = "z") -> tuple[Tensor, tuple[int, ...]]:
    """Validate ``z`` and flatten it to ``(N, D)`` vectors.

    Args:
        z: ``(B, D, H, W)`` feature map or ``(N, D)`` vectors.
        dim: Expected channel count ``D``.
        name: Name used in error messages.

    Returns:
        ``(flat, grid)``: ``flat`` is ``(N, D)``; ``grid`` is the shape of ``z`` without the channel axis, used by
        :func:`restore_layout` and as the indices' shape.
    """
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.ndim not in (2, 4):
        raise ValueError(
            f"{name} must be a feature map (B, D, H, W) or vectors (N, D); got a tensor of rank {z.ndim} "
            f"with shape {tuple(z.shape)}"
        )
    if z.shape[1] != dim:
        raise ValueError(f"{name} must have {dim} channels on axis 1, got {z.shape[1]} (shape {tuple(z.shape)})")
    if not z.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {z.dtype}")
    if values_checked() and not torch.isfinite(z).all():
        bad = int((~torch.isfinite(z)).sum())
        raise ValueError(f"{name} contains {bad} non-finite values (NaN or inf); expected finite features")
    if z.ndim == 2:
        return z, (z.shape[0],)
    b, d, h, w = z.shape
    return z.permute(0, 2, 3, 1).reshape(b * h * w, d), (b, h, w)


def restore_layout(flat: Tensor, grid: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`channels_last_flat`: ``(N, D)`` vectors back to ``(B, D, H, W)`` for a ``(B, H, W)`` grid,
    else to ``(*grid, D)`` (``(N, D)`` for vectors)."""
    if len(grid) != 3:
        return flat.reshape(*grid, flat.shape[-1])
    b, h, w = grid
    return flat.reshape(b, h, w, flat.shape[-1]).permute(0, 3, 1, 2)


def check_indices(indices: Tensor, codebook_size: int, name: str = "indices") -> None:
    """Raise a clear error unless ``indices`` is an integer tensor with values in ``[0, codebook_size)``."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {indices.dtype}")
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= codebook_size:
        raise ValueError(
            f"{name} must lie in [0, {codebook_size - 1}] for a codebook of {codebook_size} codes; "
            f"got values in [{lo}, {hi}]"
        )


def weighted_total(losses: dict[str, Tensor], weights: dict[str, float], like: Tensor) -> Tensor:
    """Sum ``weights[name] * losses[name]`` over the terms present; zero (on ``like``'s device) when empty."""
    total = like.new_zeros(())
    for name, value in losses.items():
        total = total + weights.get(name, 1.0) * value
    return total


class Quantizer(nn.Module):
    """Base class of every fvq quantizer.

    Subclasses set ``codebook_dim`` (channels ``D`` of the input), ``codebook_size`` (number of distinct ids at one
    code position) and ``codes_per_position`` (1 unless several codes describe one position), and implement
    ``forward``, ``encode`` and ``decode``.
    """

    codebook_dim: int
    codebook_size: int
    codes_per_position: int = 1

    @property
    def index_shape(self) -> str:
        """The axes of the indices ``encode`` returns and ``decode`` takes: ``"(B, h, w)"`` for one code per
        position, ``"(B, h, w, codes)"`` for several; a quantizer with another token layout overrides it."""
        return "(B, h, w)" if self.codes_per_position == 1 else "(B, h, w, codes)"

    # ---------------------------------------------------------------------------------------------------------------
    # what the trainer needs to know
    def sub_quantizers(self) -> list[Quantizer]:
        """The quantizers this one is made of (the nearest :class:`Quantizer` descendants; empty for a leaf)."""
        found: list[Quantizer] = []
        pending = list(self.children())
        while pending:
            module = pending.pop(0)
            if isinstance(module, Quantizer):
                found.append(module)
            else:
                pending.extend(module.children())
        return found

    def set_step(self, step: int) -> None:
        """Tell the quantizer the optimizer step, the same on every rank, before each training step.

        Step-dependent schedules (a Gumbel temperature) and randomness that every rank must draw alike (the depth of
        quantizer dropout) are pure functions of it, so a resumed run, on any number of ranks, draws what the
        uninterrupted one drew. The default passes the step to :meth:`sub_quantizers`.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        for sub in self.sub_quantizers():
            sub.set_step(step)

    @property
    def may_leave_parameters_unused(self) -> bool:
        """Whether a training step may leave some parameters without a gradient (DDP must then look for unused
        parameters). The default asks :meth:`sub_quantizers`."""
        return any(sub.may_leave_parameters_unused for sub in self.sub_quantizers())

    def forward(self, z: Tensor) -> QuantizerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Map features ``(B, D, H, W)`` or ``(N, D)`` to int64 indices ``(B, H, W)`` or ``(N,)``."""
        raise NotImplementedError

    def decode(self, indices: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Map indices ``(B, H, W)`` or ``(N,)`` back to quantized features ``(B, D, H, W)`` or ``(N, D)``."""
        raise NotImplementedError

    def export(self) -> Quantizer:
        """A quantizer for inference with identical outputs and no training-only parts (default: itself)."""
        return self

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}"
