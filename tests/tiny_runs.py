"""Overrides that shrink a packaged tokenizer config to one that trains in seconds, for the tests that run it."""

TINY_TOKENIZER = [
    "model.preset=tiny_f4",
    "quantizer.codebook_size=64",
    "quantizer.codebook_dim=16",
    "quantizer.projector.group_size=8",
    "quantizer.projector.hidden_dim=32",
    "data.image_size=16",
]
