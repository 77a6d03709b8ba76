"""Grouped (product) quantization: split the channels into G groups and quantize each group on its own.

Product quantization (Jégou et al., TPAMI 2011, https://doi.org/10.1109/TPAMI.2010.57); as a tokenizer bottleneck e.g.
ImageFolder's product quantization (Li et al., 2024, https://arxiv.org/abs/2410.01756). With K codes per group the
joint vocabulary is ``K^G`` while each nearest-code search stays over K codes of width ``D / G``; every token uses
every sub-codebook, which keeps them populated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fvq.quantizers.base import Quantizer, QuantizerOutput, channels_last_flat
from fvq.quantizers.residual import _check_sub_quantizers


def group_dim(codebook_dim: int, num_groups: int) -> int:
    """Channels per group, ``codebook_dim / num_groups``; a clear error unless ``num_groups`` divides it."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if codebook_dim % num_groups:
        raise ValueError(
            f"num_groups={num_groups} must divide codebook_dim={codebook_dim} "
            f"({codebook_dim} channels cannot be split into {num_groups} equal groups)"
        )
    return codebook_dim // num_groups


class GroupedQuantizer(Quantizer):
    """Product quantizer: channel group ``g`` (channels ``[g * D/G, (g + 1) * D/G)``) goes to sub-quantizer ``g``.

    Args:
        quantizer: One quantizer of width ``D / G`` reused for every group (one shared sub-codebook), or a sequence of
            ``G`` per-group quantizers.
        num_groups: G when ``quantizer`` is a single module (required then); must equal ``len(quantizer)`` otherwise.

    Outputs: ``quantized`` is the concatenation of the groups' outputs along channels; ``indices``
    ``(B, H, W, G)`` or ``(N, G)``; ``losses``/``loss`` the means over groups; ``metrics`` per group
    (``group{g}/usage``...) and their means.
    """

    def __init__(self, quantizer: Quantizer | Sequence[Quantizer], *, num_groups: int | None = None) -> None:
        super().__init__()
        if isinstance(quantizer, Quantizer):
            if num_groups is None or num_groups < 1:
                raise ValueError(f"num_groups must be >= 1 with one shared quantizer, got {num_groups}")
            layers = [quantizer]
            self.shared = True
        else:
            layers = list(quantizer)
            if not layers:
                raise ValueError("GroupedQuantizer needs at least one quantizer")
            if num_groups is not None and num_groups != len(layers):
                raise ValueError(f"num_groups={num_groups} but {len(layers)} quantizers were given")
            num_groups = len(layers)
            self.shared = False
        self.group_dim, self.codebook_size = _check_sub_quantizers(layers, "GroupedQuantizer")
        self.layers = nn.ModuleList(layers)
        self.num_groups = num_groups
        self.codebook_dim = num_groups * self.group_dim
        self.codes_per_position = num_groups

    def quantizer_at(self, group: int) -> Quantizer:
        return self.layers[0 if self.shared else group]

    def _split(self, z: Tensor) -> tuple[Tensor, ...]:
        channels_last_flat(z, self.codebook_dim)  # validates rank, channels and values
        return torch.split(z, self.group_dim, dim=1)  # G x (B, D/G, H, W) or G x (N, D/G)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(B, D, H, W)`` or ``(N, D)`` with one code per group."""
        outs = [self.quantizer_at(g)(part) for g, part in enumerate(self._split(z))]
        metrics: dict[str, Tensor] = {}
        for g, out in enumerate(outs):
            metrics.update({f"group{g}/{k}": v for k, v in out.metrics.items()})
        for key in ("usage", "perplexity"):
            values = [out.metrics[key] for out in outs if key in out.metrics]
            if values:
                metrics[key] = torch.stack(values).float().mean()
        names = dict.fromkeys(k for out in outs for k in out.losses)
        losses = {k: torch.stack([out.losses[k] for out in outs if k in out.losses]).mean() for k in names}
        return QuantizerOutput(
            quantized=torch.cat([out.quantized for out in outs], dim=1),  # (B, D, H, W) or (N, D)
            indices=torch.stack([out.indices for out in outs], dim=-1),  # (..., G)
            loss=torch.stack([out.loss for out in outs]).mean(),
            losses=losses,
            metrics=metrics,
        )

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """Indices ``(B, H, W, G)`` or ``(N, G)``."""
        return torch.stack([self.quantizer_at(g).encode(part) for g, part in enumerate(self._split(z))], dim=-1)

    def decode(self, indices: Tensor) -> Tensor:
        """Indices ``(B, H, W, G)`` or ``(N, G)`` -> ``(B, D, H, W)`` or ``(N, D)``."""
        if not isinstance(indices, Tensor) or indices.ndim < 2 or indices.shape[-1] != self.num_groups:
            shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"indices must be (B, H, W, {self.num_groups}) or (N, {self.num_groups}), got {shape}")
        parts = [self.quantizer_at(g).decode(indices[..., g]) for g in range(self.num_groups)]
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def export(self) -> GroupedQuantizer:
        """Same quantizer with every group exported (projectors folded); a shared sub-codebook stays shared."""
        layers = [layer.export() for layer in self.layers]
        return GroupedQuantizer(layers[0] if self.shared else layers, num_groups=self.num_groups).train(self.training)

    def extra_repr(self) -> str:
        return (
            f"num_groups={self.num_groups}, shared={self.shared}, group_dim={self.group_dim}, "
            f"codebook_size={self.codebook_size} per group, codebook_dim={self.codebook_dim}"
        )
