"""Gradient estimators through the nearest-code assignment of a vector quantizer.

Every estimator here keeps the *value* a decoder sees exactly equal to a code vector (except ``"soft"``, a mixture by
definition) and differs only in the gradient it sends back:

* ``"ste"``: straight-through (Bengio et al., 2013, https://arxiv.org/abs/1308.3432; VQ-VAE): identity gradient to
  ``z``; see :func:`fvq.quantizers.functional.straight_through`.
* ``"rotation"``: rotation trick (Fifty et al., 2024, "Restructuring Vector Quantization with the Rotation Trick",
  https://arxiv.org/abs/2410.06424): :func:`rotation_trick`.
* ``"ibq"``: index backpropagation (Shi et al., 2025, "Scalable Image Tokenization with Index Backpropagation
  Quantization", https://arxiv.org/abs/2412.02692): :func:`index_backprop_quantize`; every code gets a gradient.
* ``"soft"``: softmax assignment ``z_q = softmax(-||z - c||^2 / tau) @ C`` (soft VQ, survey section 2.2.2):
  :func:`soft_quantize`.
* ``"gumbel"``: straight-through Gumbel-softmax (Jang et al., 2017, https://arxiv.org/abs/1611.01144; Maddison et
  al., 2017): :func:`gumbel_quantize`; the forward value is the sampled code.

``"ibq"``, ``"soft"`` and ``"gumbel"`` need ``N x K`` logits. They are computed in row chunks of at most
``max_chunk_bytes`` and each chunk is recomputed in the backward pass (activation checkpointing), so the extra memory
is ``O(chunk x K)`` instead of ``O(N x K)``, at the cost of one more ``N x K x D`` matmul in the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fvq.quantizers.search import DEFAULT_MAX_CHUNK_BYTES

ESTIMATORS = ("ste", "rotation", "ibq", "soft", "gumbel")


# ---------------------------------------------------------------------------------------------------------------------
# temperature
# ---------------------------------------------------------------------------------------------------------------------
def annealed_temperature(step: int, start: float, end: float | None = None, steps: int = 0) -> float:
    """Temperature of a softmax assignment at ``step``: exponential interpolation from ``start`` to ``end``.

    ``tau(t) = start * (end / start) ** min(t / steps, 1)`` (the exponential schedule of Jang et al., 2017); constant
    ``start`` when ``end`` is ``None`` or ``steps == 0``. A pure function of the step.

    Args:
        step: Training step (>= 0).
        start: Temperature at step 0 (> 0).
        end: Temperature reached at ``steps`` and kept afterwards (> 0), or ``None``.
        steps: Length of the annealing.
    """
    if start <= 0 or (end is not None and end <= 0):
        raise ValueError(f"temperatures must be > 0, got start={start}, end={end}")
    if end is None or steps <= 0:
        return float(start)
    frac = min(max(step, 0) / steps, 1.0)
    return float(start * math.exp(frac * math.log(end / start)))


# ---------------------------------------------------------------------------------------------------------------------
# logits and chunking
# ---------------------------------------------------------------------------------------------------------------------
def assignment_logits(z: Tensor, codes: Tensor, temperature: float) -> Tensor:
    """Logits of a softmax over codes, ``-||z - c||^2 / tau`` up to a per-row constant, in fp32.

    ``-||z - c||^2 = 2 z.c - ||c||^2 - ||z||^2``; the last term is the same for every code of a row and cancels in the
    softmax, so it is dropped. The argmax of these logits is the nearest code.

    Args:
        z: ``(n, D)``.
        codes: ``(K, D)``.
        temperature: tau > 0.

    Returns:
        ``(n, K)`` fp32 logits.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, codes = z.float(), codes.float()
        logits = torch.addmm(codes.square().sum(dim=1), z, codes.t(), beta=-1.0, alpha=2.0)  # (n, K)
        return logits / temperature


def rows_per_chunk(num_codes: int, max_chunk_bytes: int) -> int:
    """Rows of an ``(n, K)`` fp32 block (about four live copies in forward and backward) within ``max_chunk_bytes``."""
    return max(1, max_chunk_bytes // (16 * num_codes))


def _map_row_chunks(
    fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], z: Tensor, codes: Tensor, max_chunk_bytes: int
) -> tuple[Tensor, Tensor]:
    """Apply ``fn(z_chunk, codes) -> (out (n, D), idx (n,))`` to row chunks of ``z``, checkpointing each chunk.

    Checkpointing keeps the RNG state, so a chunk that samples noise draws the same noise when it is recomputed.
    """
    chunk = rows_per_chunk(codes.shape[0], max_chunk_bytes)
    needs_grad = torch.is_grad_enabled() and (z.requires_grad or codes.requires_grad)
    if z.shape[0] <= chunk or not needs_grad:
        outs = [fn(z[i : i + chunk], codes) for i in range(0, max(z.shape[0], 1), chunk)]
    else:
        outs = [checkpoint(fn, z[i : i + chunk], codes, use_reentrant=False) for i in range(0, z.shape[0], chunk)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


# ---------------------------------------------------------------------------------------------------------------------
# estimators
# ---------------------------------------------------------------------------------------------------------------------
def rotation_trick(z: Tensor, quantized: Tensor, eps: float = 1e-6) -> Tensor:
    """Rotation trick (Fifty et al., 2024): forward value ``quantized``; gradient through a fixed rotation-and-scale.

    With ``e = z``, ``q = quantized``, unit vectors ``e^ = e / ||e||``, ``q^ = q / ||q||``, ``r = (e^ + q^) /
    ||e^ + q^||`` and ``lambda = ||q|| / ||e||``, the Householder-based rotation ``R = I - 2 r r^T + 2 q^ e^T`` maps
    ``e^`` to ``q^`` and ``lambda R e = q``. The output is ``sg[lambda R] e``: in the backward pass ``R`` and
    ``lambda`` are constants, so ``dL/de = lambda R^T dL/dq``; the angle between the gradient and the code vector is
    preserved instead of being copied unchanged as in the straight-through estimator. ``R`` is never formed: ``R e``
    costs ``O(D)`` per row. Rows with ``||e|| < eps`` fall back to the straight-through gradient. No gradient reaches
    ``quantized`` through this output (the codebook learns from its own loss, as with straight-through).

    Args:
        z: ``(N, D)`` encoder outputs ``e``.
        quantized: ``(N, D)`` selected codes ``q``.
        eps: Norm below which a vector is treated as zero.

    Returns:
        ``(N, D)`` tensor equal to ``quantized`` (bit-exact) with the rotation-trick gradient to ``z``.
    """
    with torch.no_grad():
        e_norm = z.norm(dim=-1, keepdim=True)  # (N, 1)
        q_norm = quantized.norm(dim=-1, keepdim=True)  # (N, 1)
        e_hat = z / e_norm.clamp_min(eps)  # (N, D)
        q_hat = quantized / q_norm.clamp_min(eps)  # (N, D)
        r = F.normalize(e_hat + q_hat, dim=-1, eps=eps)  # (N, D); 0 when q^ = -e^: R = I - 2 e^ e^T
        scale = q_norm / e_norm.clamp_min(eps)  # (N, 1) lambda
        degenerate = e_norm < eps  # (N, 1)
    # lambda (e - 2 r (r.e) + 2 q^ (e^.e)), with r, q^, e^, lambda constants
    rotated = scale * (
        z - 2 * r * (r * z).sum(dim=-1, keepdim=True) + 2 * q_hat * (e_hat * z).sum(dim=-1, keepdim=True)
    )  # (N, D)
    grad_path = torch.where(degenerate, z, rotated)  # (N, D)
    return quantized.detach() + (grad_path - grad_path.detach())


def index_backprop_quantize(
    z: Tensor,
    codes: Tensor,
    indices: Tensor,
    temperature: float = 1.0,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> Tensor:
    """Index backpropagation quantization (IBQ, Shi et al., 2025).

    ``z_q = (onehot(k) - sg[p] + p) @ C`` with ``p = softmax(logits / tau)``: the value is the code ``C[k]`` exactly,
    while the gradient flows through the soft assignment ``p`` to ``z`` and to *every* code (a hard straight-through on
    the one-hot of the softmax). IBQ uses inner-product logits; here the logits are ``-||z - c||^2 / tau`` so that the
    hard index is the nearest code found by the search (identical to inner products on l2-normalised codes).

    Args:
        z: ``(N, D)`` encoder outputs.
        codes: ``(K, D)`` codebook (differentiable).
        indices: ``(N,)`` nearest-code ids ``k`` (the argmax of the logits).
        temperature: tau of the softmax.
        max_chunk_bytes: Memory bound of one ``(n, K)`` logits block; chunks are recomputed in the backward pass.

    Returns:
        ``(N, D)`` quantized vectors equal to ``codes[indices]``.
    """

    def soft_delta(zc: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        p = assignment_logits(zc, c, temperature).softmax(dim=-1)  # (n, K)
        delta = (p - p.detach()) @ c.float()  # (n, D), exactly zero in value
        return delta, zc.new_zeros(0, dtype=torch.long)

    hard = codes.index_select(0, indices)  # (N, D), gradient to the selected codes
    delta, _ = _map_row_chunks(soft_delta, z, codes, max_chunk_bytes)  # (N, D)
    return hard + delta.to(hard.dtype)


def soft_quantize(
    z: Tensor, codes: Tensor, temperature: float = 1.0, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> Tensor:
    """Soft VQ: the softmax mixture ``softmax(-||z - c||^2 / tau) @ C`` (survey section 2.2.2).

    Not a code vector: use it for training only; the quantizer switches to the nearest code in eval mode.

    Args:
        z: ``(N, D)``.
        codes: ``(K, D)``.
        temperature: tau (small tau approaches the nearest code).
        max_chunk_bytes: Memory bound of one ``(n, K)`` block.

    Returns:
        ``(N, D)`` mixtures of codes.
    """

    def mix(zc: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        p = assignment_logits(zc, c, temperature).softmax(dim=-1)  # (n, K)
        return p @ c.float(), zc.new_zeros(0, dtype=torch.long)  # (n, D)

    out, _ = _map_row_chunks(mix, z, codes, max_chunk_bytes)
    return out.to(z.dtype)


def gumbel_quantize(
    z: Tensor,
    codes: Tensor,
    temperature: float = 1.0,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> tuple[Tensor, Tensor]:
    """Straight-through Gumbel-softmax over codes (Jang et al., 2017).

    ``y = softmax((-||z - c||^2 + g) / tau)`` with Gumbel noise ``g = -log(-log u)``; the index is ``argmax y`` (a
    sample of ``softmax(-||z - c||^2)``), the value is that code exactly and the gradient is the relaxed one:
    ``z_q = (onehot - sg[y] + y) @ C``.

    Args:
        z: ``(N, D)``.
        codes: ``(K, D)``.
        temperature: tau of the relaxation.
        max_chunk_bytes: Memory bound of one ``(n, K)`` block.

    Returns:
        ``(quantized, indices)``: ``(N, D)`` sampled codes with relaxed gradients and their ``(N,)`` int64 ids.
    """

    def sample(zc: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        logits = assignment_logits(zc, c, 1.0)  # (n, K)
        u = torch.rand_like(logits).clamp_(torch.finfo(logits.dtype).tiny, 1.0)
        y = ((logits - torch.log(-torch.log(u))) / temperature).softmax(dim=-1)  # (n, K)
        idx = y.argmax(dim=-1)  # (n,)
        delta = (y - y.detach()) @ c.float()  # (n, D), zero in value
        return delta, idx

    delta, indices = _map_row_chunks(sample, z, codes, max_chunk_bytes)
    hard = codes.index_select(0, indices)  # (N, D)
    return hard + delta.to(hard.dtype), indices
