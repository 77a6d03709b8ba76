"""fvq: train, evaluate and use discrete image tokenizers whose codebooks are fully used."""

from fvq.version import __version__

__all__ = ["__version__"]


def __getattr__(name: str):
    # Lazy so that `import fvq` (and the CLI's start-up) does not import torch.
    if name in ("Tokenizer", "TokenizerOutput"):
        from fvq.models import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'fvq' has no attribute {name!r}")
