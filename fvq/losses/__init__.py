"""Tokenizer training losses: LPIPS, GAN objectives and the combined :class:`TokenizerLoss`."""

from fvq.losses.adversarial import GAN_LOSSES, adaptive_weight, adopt_weight, discriminator_loss, generator_loss
from fvq.losses.lpips import LPIPS, download_weights, find_weights, load_weights
from fvq.losses.tokenizer_loss import DiscriminatorLossOutput, GeneratorLossOutput, TokenizerLoss

__all__ = [
    "GAN_LOSSES",
    "LPIPS",
    "DiscriminatorLossOutput",
    "GeneratorLossOutput",
    "TokenizerLoss",
    "adaptive_weight",
    "adopt_weight",
    "discriminator_loss",
    "download_weights",
    "find_weights",
    "generator_loss",
    "load_weights",
]
