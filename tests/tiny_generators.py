"""A tiny tokenizer config and tiny random GPTs on its 4 x 4 grid, exported as a generator run writes them, for the
tests of the generation API and of ``fvq sample``."""

from __future__ import annotations

import torch

from fvq.generation import GPT, GPTConfig
from fvq.training.generator_task import TokenData, export_generator

TOKENIZER = {"model": {"preset": "tiny_f4"}, "quantizer": {"type": "vq", "codebook_size": 32, "codebook_dim": 8}}
GRID = (4, 4)  # tiny_f4 at 16 x 16 px
CLASSES = 5


def tiny_gpt(seed: int, vocab_size: int = 32, class_dropout_prob: float = 0.1) -> GPT:
    """2 layers, width 32, random weights everywhere (the zero head of a fresh GPT would give uniform logits)."""
    config = GPTConfig(
        dim=32,
        n_layer=2,
        n_head=2,
        vocab_size=vocab_size,
        grid=GRID,
        num_classes=CLASSES,
        class_dropout_prob=class_dropout_prob,
        token_dropout_prob=0.0,
        resid_dropout_prob=0.0,
        ffn_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if p.ndim == 1 or "embedding" in name else p.shape[1] ** -0.5
            p.copy_(torch.randn(p.shape) * scale + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def export(model: GPT, directory, identity: str | None) -> str:
    """``RUN/model`` as the generator task writes it (a bare save_pretrained when ``identity`` is None)."""
    if identity is None:
        model.save_pretrained(directory)
        return str(directory)
    data = TokenData(
        vocab_size=model.config.vocab_size, grid=GRID, num_classes=CLASSES, class_names=(), model_identity=identity
    )
    export_generator(model.state_dict(), model.config, directory, data=data, training={"step": 9})
    return str(directory)
