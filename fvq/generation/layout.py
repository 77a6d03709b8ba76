"""How a tokenizer's codes become the generator's token sequence: one code per grid position, raster order.

The generator reads a ``(h, w)`` grid of code ids as a sequence of ``T = h * w`` tokens in raster order (token ``t``
sits at row ``t // w``, column ``t % w``). Tokenizers that emit several codes per position (residual or grouped
quantizers) or a multi-scale sequence (VAR-style next-scale maps) do not fit this layout and are refused here, so a
mismatch is reported where the generator is built rather than as a shape error deep inside training or sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

SUPPORTED_LAYOUT = (
    "single-code grids: one code per position, e.g. a plain, FSQ, LFQ/BSQ or VQBridge quantizer, read in raster order"
)


def check_token_layout(codes_per_position: int, *, what: str = "the tokenizer") -> None:
    """Raise ``ValueError`` unless ``codes_per_position`` is 1 (the layout the generator models).

    Args:
        codes_per_position: Codes describing one grid position (``quantizer.codes_per_position``; 1 for plain VQ,
            ``num_quantizers`` for residual, ``num_groups`` for grouped quantizers).
        what: Name of the token source, for the message.
    """
    if isinstance(codes_per_position, bool) or not isinstance(codes_per_position, int) or codes_per_position < 1:
        raise ValueError(f"codes_per_position must be a positive int, got {codes_per_position!r}")
    if codes_per_position != 1:
        raise ValueError(
            f"{what} emits {codes_per_position} codes per position (a residual or grouped quantizer); the "
            f"generator supports {SUPPORTED_LAYOUT}"
        )


@dataclass(frozen=True)
class TokenLayout:
    """What the generator needs to know about its tokens.

    Attributes:
        vocab_size: Distinct code ids (the tokenizer's ``codebook_size``).
        grid: Token grid ``(h, w)``; the sequence length is ``h * w``.
    """

    vocab_size: int
    grid: tuple[int, int]

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, image_size: int | tuple[int, int]) -> TokenLayout:
        """The layout of ``tokenizer``'s codes for images of ``image_size`` (an int for square images, or ``(H, W)``).

        Raises ``ValueError`` for multi-code or multi-scale tokenizers and for sizes the tokenizer cannot encode.
        """
        quantizer = tokenizer.quantizer
        if hasattr(quantizer, "split_indices"):
            raise ValueError(
                f"the tokenizer's {type(quantizer).__name__} emits a multi-scale sequence of token maps, not one "
                f"grid; the generator supports {SUPPORTED_LAYOUT}"
            )
        check_token_layout(int(getattr(quantizer, "codes_per_position", 1)))
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        grid = tokenizer.latent_shape(int(height), int(width))
        return cls(vocab_size=int(tokenizer.codebook_size), grid=(int(grid[0]), int(grid[1])))


def tokens_to_grid(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Reshape raster-ordered tokens ``(B, h * w)`` to the tokenizer's index grid ``(B, h, w)``."""
    h, w = grid
    if tokens.ndim != 2 or tokens.shape[1] != h * w:
        raise ValueError(f"tokens must have shape (B, {h * w}) for a {h}x{w} grid, got {tuple(tokens.shape)}")
    return tokens.reshape(tokens.shape[0], h, w)


def grid_to_tokens(indices: Tensor) -> Tensor:
    """Flatten a tokenizer index grid ``(B, h, w)`` to raster-ordered tokens ``(B, h * w)``."""
    if indices.ndim != 3:
        extra = " (several codes per position are not supported)" if indices.ndim == 4 else ""
        raise ValueError(f"indices must have shape (B, h, w), got {tuple(indices.shape)}{extra}")
    return indices.reshape(indices.shape[0], -1)
