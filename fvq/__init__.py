"""fvq: train, evaluate and use discrete image tokenizers whose codebooks are fully used."""

__version__ = "0.1.0"
