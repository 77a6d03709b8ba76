"""The tokenizer's training objective (FVQ paper, appendix F, eq. 35; recipe of appendix G / LlamaGen):

    L = w_rec * L_rec + w_perc * LPIPS + w_q * L_quantizer + w_adv(step) * L_G

with L_rec the mean squared (or absolute) pixel error, LPIPS-VGG16 the perceptual term, L_quantizer the quantizer's
own weighted loss (codebook + 0.25 commitment for VQ), and L_G a PatchGAN generator loss that joins at
``adversarial_start``, optionally scaled by VQGAN's adaptive weight. The discriminator is owned here and trained
with :meth:`TokenizerLoss.discriminator_loss`.

Losses compute and return values; they never log and never step optimisers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fvq.losses import adversarial as adv
from fvq.losses.discriminator import PatchGANDiscriminator
from fvq.quantizers.base import QuantizerOutput

__all__ = ["DiscriminatorLossOutput", "GeneratorLossOutput", "TokenizerLoss"]


@dataclass
class GeneratorLossOutput:
    """Result of :meth:`TokenizerLoss.generator_loss`.

    Attributes:
        loss: Scalar total to back-propagate into the tokenizer.
        terms: Detached scalars: ``loss``, ``reconstruction``, ``perceptual`` (when used), ``quantizer`` (weighted
            quantizer loss) and ``quantizer/<name>`` (its unweighted terms), ``adversarial`` (generator GAN loss,
            0 before the start step) and ``adversarial_weight`` (effective weight, adaptive factor included).
    """

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class DiscriminatorLossOutput:
    """Result of :meth:`TokenizerLoss.discriminator_loss`.

    Attributes:
        loss: Scalar to back-propagate into the discriminator (multiplied by 0 before the start step).
        terms: Detached scalars: ``discriminator/loss`` (unscaled), ``discriminator/logits_real`` and
            ``discriminator/logits_fake`` (mean logits).
    """

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


def _non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


class TokenizerLoss(nn.Module):
    """Reconstruction + perceptual + quantizer + adversarial loss for a VQ tokenizer, with its PatchGAN.

    Args:
        reconstruction_loss: ``"l2"`` (mean squared error, the reference) or ``"l1"`` (mean absolute error).
        reconstruction_weight: Weight of the pixel loss.
        perceptual_weight: Weight of LPIPS. 0 disables it: no LPIPS network is built and no weights are needed.
        perceptual_net: LPIPS trunk, ``"vgg"`` (reference) or ``"alex"``.
        adversarial_weight: Weight of the generator GAN loss (0.5 in the reference). 0 disables the GAN: no
            discriminator is built.
        adversarial_start: Step at which the GAN joins (20,000 in the reference); before it both GAN losses weigh 0
            and the generator pass skips the discriminator.
        gan_loss: ``"hinge"`` (reference), ``"non_saturating"`` (also spelled ``"non-saturating"``) or ``"vanilla"``.
        adaptive_weight: Scale the GAN loss by VQGAN's adaptive weight (needs ``last_layer``; off in the reference).
        quantizer_weight: Weight of the quantizer's own (already weighted) loss.
        discriminator: Keyword arguments of :class:`~fvq.losses.discriminator.PatchGANDiscriminator`
            (``base_channels``, ``num_layers``, ``norm``, ...), or a ready discriminator module mapping
            ``(B, 3, H, W)`` images to logits.
        perceptual: A ready perceptual module ``(input, target) -> (B,)`` used instead of building LPIPS.
        perceptual_weights: Explicit LPIPS weight file or folder (see :func:`fvq.losses.lpips.find_weights`).
        allow_download: Let LPIPS fetch its official weights once if none are found locally.
        max_adaptive_weight: Upper clamp of the adaptive weight (1e4 in VQGAN).

    The LPIPS network is frozen and kept out of this module's ``state_dict()`` and ``parameters()`` (it is
    reloaded from its weight files, and checkpoints stay small); ``.to()`` still moves it. The state dict holds the
    discriminator only.
    """

    def __init__(
        self,
        *,
        reconstruction_loss: Literal["l2", "l1"] = "l2",
        reconstruction_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        perceptual_net: str = "vgg",
        adversarial_weight: float = 0.5,
        adversarial_start: int = 20_000,
        gan_loss: str = "hinge",
        adaptive_weight: bool = False,
        quantizer_weight: float = 1.0,
        discriminator: dict[str, Any] | nn.Module | None = None,
        perceptual: nn.Module | None = None,
        perceptual_weights: str | None = None,
        allow_download: bool = False,
        max_adaptive_weight: float = 1e4,
    ) -> None:
        super().__init__()
        if reconstruction_loss not in ("l2", "l1"):
            raise ValueError(f"reconstruction_loss must be 'l2' or 'l1', got {reconstruction_loss!r}")
        if isinstance(adversarial_start, bool) or not isinstance(adversarial_start, int) or adversarial_start < 0:
            raise ValueError(f"adversarial_start must be a non-negative int, got {adversarial_start!r}")
        if not isinstance(adaptive_weight, bool):
            raise TypeError(f"adaptive_weight must be a bool, got {type(adaptive_weight).__name__}")
        self.reconstruction_loss = reconstruction_loss
        self.reconstruction_weight = _non_negative("reconstruction_weight", reconstruction_weight)
        self.perceptual_weight = _non_negative("perceptual_weight", perceptual_weight)
        self.adversarial_weight = _non_negative("adversarial_weight", adversarial_weight)
        self.quantizer_weight = _non_negative("quantizer_weight", quantizer_weight)
        self.max_adaptive_weight = _non_negative("max_adaptive_weight", max_adaptive_weight)
        self.adversarial_start = adversarial_start
        self.gan_loss = adv.canonical_gan_loss(gan_loss)
        self.adaptive_weight = adaptive_weight
        self.perceptual_net = perceptual_net

        # LPIPS lives outside the module tree (see class docstring); _apply moves it with the module.
        lpips_module: nn.Module | None = None
        if self.perceptual_weight > 0:
            if perceptual is not None:
                lpips_module = perceptual
            else:
                from fvq.losses.lpips import LPIPS

                lpips_module = LPIPS(perceptual_net, weights=perceptual_weights, allow_download=allow_download)
            lpips_module.requires_grad_(False).eval()
        self.__dict__["_perceptual"] = lpips_module

        self.discriminator: nn.Module | None
        if self.adversarial_weight > 0:
            if isinstance(discriminator, nn.Module):
                self.discriminator = discriminator
            elif discriminator is None or isinstance(discriminator, dict):
                self.discriminator = PatchGANDiscriminator(**(discriminator or {}))
            else:
                raise TypeError(
                    f"discriminator must be a dict of PatchGANDiscriminator arguments or an nn.Module, "
                    f"got {type(discriminator).__name__}"
                )
        else:
            self.discriminator = None

    @property
    def perceptual(self) -> nn.Module | None:
        """The frozen LPIPS network, or None when ``perceptual_weight`` is 0."""
        return self.__dict__["_perceptual"]

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        super()._apply(fn, recurse)
        if self.perceptual is not None:
            self.perceptual._apply(fn)
        return self

    def adversarial_active(self, step: int) -> bool:
        """Whether the GAN terms count at ``step`` (a discriminator exists and ``step >= adversarial_start``)."""
        return self.discriminator is not None and step >= self.adversarial_start

    @staticmethod
    def _check_pair(images: Tensor, reconstruction: Tensor) -> None:
        if not isinstance(images, Tensor) or not isinstance(reconstruction, Tensor):
            raise TypeError("images and reconstruction must be torch.Tensors")
        if images.ndim != 4 or images.shape != reconstruction.shape:
            raise ValueError(
                f"images and reconstruction must both be (B, C, H, W) of the same shape, got {tuple(images.shape)} "
                f"and {tuple(reconstruction.shape)}"
            )

    def _discriminator_frozen(self, images: Tensor) -> Tensor:
        """Discriminator logits whose gradient reaches ``images`` but not the discriminator's parameters."""
        assert self.discriminator is not None
        params = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return functional_call(self.discriminator, params, (images,), strict=False)

    def generator_loss(
        self,
        images: Tensor,
        reconstruction: Tensor,
        quantizer_output: QuantizerOutput,
        step: int,
        last_layer: Tensor | None = None,
    ) -> GeneratorLossOutput:
        """Loss of the tokenizer (encoder, quantizer, decoder) for one batch.

        Args:
            images: Targets ``(B, 3, H, W)`` in ``[-1, 1]``.
            reconstruction: Decoder output ``(B, 3, H, W)``.
            quantizer_output: The quantizer's :class:`~fvq.quantizers.base.QuantizerOutput`; its ``loss`` is
                weighted by ``quantizer_weight`` and its ``losses`` reported as ``quantizer/<name>``.
            step: Global optimizer step (decides whether the GAN term is on).
            last_layer: The decoder's final weight; required when ``adaptive_weight`` is on.

        Returns:
            :class:`GeneratorLossOutput`. The discriminator's parameters get no gradient from this loss.
        """
        self._check_pair(images, reconstruction)
        if not isinstance(quantizer_output, QuantizerOutput):
            raise TypeError(f"quantizer_output must be a QuantizerOutput, got {type(quantizer_output).__name__}")
        target, recon = images.float(), reconstruction.float()
        terms: dict[str, Tensor] = {}

        if self.reconstruction_loss == "l2":
            rec = F.mse_loss(recon, target)
        else:
            rec = F.l1_loss(recon, target)
        terms["reconstruction"] = rec
        nll = self.reconstruction_weight * rec
        if self.perceptual is not None:
            perc = self.perceptual(target, recon).mean()
            terms["perceptual"] = perc
            nll = nll + self.perceptual_weight * perc

        q = quantizer_output.loss.float()
        terms["quantizer"] = q
        for name, value in quantizer_output.losses.items():
            terms[f"quantizer/{name}"] = value
        loss = nll + self.quantizer_weight * q

        if self.adversarial_active(step):
            logits_fake = self._discriminator_frozen(reconstruction)  # (B, 1, h, w)
            g = adv.generator_loss(logits_fake, self.gan_loss)
            weight = torch.tensor(self.adversarial_weight, device=g.device)
            if self.adaptive_weight:
                if last_layer is None:
                    raise ValueError("adaptive_weight=True needs last_layer (the decoder's final weight tensor)")
                if torch.is_grad_enabled() and g.requires_grad and nll.requires_grad:
                    weight = weight * adv.adaptive_weight(nll, g, last_layer, max_weight=self.max_adaptive_weight)
                # without autograd (evaluation) the adaptive factor is undefined; the plain weight is reported
            loss = loss + weight * g
        else:
            g = loss.new_zeros(())
            weight = loss.new_zeros(())
        terms["adversarial"] = g
        terms["adversarial_weight"] = weight
        terms["loss"] = loss
        return GeneratorLossOutput(loss=loss, terms={k: v.detach().float() for k, v in terms.items()})

    def discriminator_loss(self, images: Tensor, reconstruction: Tensor, step: int) -> DiscriminatorLossOutput:
        """Loss of the discriminator on real images and (detached) reconstructions.

        Args:
            images: Real images ``(B, 3, H, W)``.
            reconstruction: Reconstructions ``(B, 3, H, W)``; detached here, so no gradient reaches the tokenizer.
            step: Global optimizer step; before ``adversarial_start`` the returned loss is multiplied by 0.

        Returns:
            :class:`DiscriminatorLossOutput`.
        """
        if self.discriminator is None:
            raise ValueError("this TokenizerLoss has no discriminator (adversarial_weight is 0)")
        self._check_pair(images, reconstruction)
        logits_real = self.discriminator(images.detach())  # (B, 1, h, w)
        logits_fake = self.discriminator(reconstruction.detach())  # (B, 1, h, w)
        d = adv.discriminator_loss(logits_real, logits_fake, self.gan_loss)
        factor = 1.0 if self.adversarial_active(step) else 0.0
        terms = {
            "discriminator/loss": d.detach(),
            "discriminator/logits_real": logits_real.detach().float().mean(),
            "discriminator/logits_fake": logits_fake.detach().float().mean(),
        }
        return DiscriminatorLossOutput(loss=factor * d, terms=terms)

    def extra_repr(self) -> str:
        perceptual = f"LPIPS-{self.perceptual_net}" if self.perceptual is not None else "off"
        return (
            f"reconstruction={self.reconstruction_loss} x{self.reconstruction_weight}, perceptual={perceptual} "
            f"x{self.perceptual_weight}, quantizer x{self.quantizer_weight}, gan={self.gan_loss} "
            f"x{self.adversarial_weight} from step {self.adversarial_start}, adaptive={self.adaptive_weight}"
        )
