"""Tokenizer models: the convolutional autoencoder, presets, the Tokenizer and the checkpoint importer."""

from fvq.models.autoencoder import Decoder, Encoder
from fvq.models.convert import import_llamagen_checkpoint
from fvq.models.presets import PRESETS, available_presets, build_autoencoder, resolve_model_config
from fvq.models.tokenizer import Tokenizer, TokenizerOutput

__all__ = [
    "PRESETS",
    "Decoder",
    "Encoder",
    "Tokenizer",
    "TokenizerOutput",
    "available_presets",
    "build_autoencoder",
    "import_llamagen_checkpoint",
    "resolve_model_config",
]
