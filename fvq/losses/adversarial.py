"""GAN losses for tokenizer training: discriminator and generator objectives, VQGAN's adaptive weight, start step.

* ``"hinge"`` (Lim & Ye, 2017, https://arxiv.org/abs/1705.02894; used by VQGAN, LlamaGen and FVQ):
  D: ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``, G: ``-mean(fake)``.
* ``"non_saturating"`` (Goodfellow et al., 2014, https://arxiv.org/abs/1406.2661, section 3):
  D: ``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))`` (binary cross-entropy), G: ``mean(softplus(-fake))``.
* ``"vanilla"``: the original minimax game; D as ``"non_saturating"``, G: ``-mean(softplus(fake))``
  (minimises ``log(1 - D(G(z)))``; saturates when D wins, kept for completeness).

All take raw logits of any shape (PatchGAN maps ``(B, 1, h, w)``) and compute in float32.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GAN_LOSSES",
    "GanLoss",
    "adaptive_weight",
    "adopt_weight",
    "canonical_gan_loss",
    "discriminator_loss",
    "generator_loss",
]

GanLoss = Literal["hinge", "non_saturating", "vanilla"]
GAN_LOSSES: tuple[str, ...] = ("hinge", "non_saturating", "vanilla")


def canonical_gan_loss(name: str) -> str:
    """Validate a GAN loss name; ``"non-saturating"`` (LlamaGen's spelling) is accepted for ``"non_saturating"``."""
    if not isinstance(name, str):
        raise TypeError(f"gan_loss must be a string, got {type(name).__name__}")
    key = name.replace("-", "_")
    if key not in GAN_LOSSES:
        raise ValueError(f"gan_loss must be one of {GAN_LOSSES}, got {name!r}")
    return key


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, kind: GanLoss = "hinge") -> Tensor:
    """Discriminator objective (to minimise).

    Args:
        logits_real: Logits on real images, any shape (e.g. ``(B, 1, h, w)``).
        logits_fake: Logits on reconstructions, any shape.
        kind: ``"hinge"``, ``"non_saturating"`` or ``"vanilla"`` (the last two share the cross-entropy D loss).

    Returns:
        Scalar loss (float32).
    """
    kind = canonical_gan_loss(kind)
    real, fake = logits_real.float(), logits_fake.float()
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def generator_loss(logits_fake: Tensor, kind: GanLoss = "hinge") -> Tensor:
    """Generator objective (to minimise) on the discriminator's logits for reconstructions.

    Args:
        logits_fake: Logits on reconstructions, any shape.
        kind: ``"hinge"``, ``"non_saturating"`` or ``"vanilla"``.

    Returns:
        Scalar loss (float32).
    """
    kind = canonical_gan_loss(kind)
    fake = logits_fake.float()
    if kind == "hinge":
        return -fake.mean()
    if kind == "non_saturating":
        return F.softplus(-fake).mean()
    return -F.softplus(fake).mean()


def adopt_weight(weight: float, step: int, start_step: int) -> float:
    """``weight`` from ``start_step`` on, 0 before (VQGAN's ``adopt_weight``: the GAN joins after a warm-up)."""
    return float(weight) if step >= start_step else 0.0


def adaptive_weight(
    nll_loss: Tensor,
    gan_loss: Tensor,
    last_layer: Tensor,
    *,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> Tensor:
    """VQGAN's adaptive GAN weight (Esser et al., 2021, https://arxiv.org/abs/2012.09841, eq. 7).

    ``||grad_L(nll)|| / (||grad_L(gan)|| + eps)`` at the decoder's last layer ``L``, clamped to
    ``[0, max_weight]`` and detached, so the adversarial gradient reaching the decoder has the size of the
    reconstruction gradient. Needs autograd: both losses must depend on ``last_layer``.

    Args:
        nll_loss: Scalar reconstruction (+ perceptual) loss.
        gan_loss: Scalar generator adversarial loss.
        last_layer: The decoder's final weight, e.g. ``(3, C, 3, 3)``.
        max_weight: Upper clamp (1e4 in VQGAN).
        eps: Added to the GAN gradient norm (1e-4 in VQGAN).

    Returns:
        Detached scalar weight (float32).
    """
    if not isinstance(last_layer, Tensor) or not last_layer.requires_grad:
        raise ValueError("adaptive_weight needs last_layer: the decoder's final weight tensor with requires_grad=True")
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    weight = nll_grad.float().norm() / (gan_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
