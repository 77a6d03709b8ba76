"""Vector quantizer with an explicit codebook and an optional codebook projector.

VQ-VAE: van den Oord et al., 2017, https://arxiv.org/abs/1711.00937 .
With ``projector=VQBridge(...)`` this is the quantizer of FVQ (Chang et al., ICLR 2026): the raw codebook ``C`` is
mapped to ``f(C)`` at every forward pass and the search runs on the mapped codebook; :meth:`VectorQuantizer.export`
computes ``f(C)`` once and returns a plain quantizer holding it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvq.quantizers.base import (
    Quantizer,
    QuantizerOutput,
    channels_last_flat,
    check_indices,
    restore_layout,
    weighted_total,
)
from fvq.quantizers.functional import DEFAULT_MAX_CHUNK_BYTES, nearest_codes, straight_through

DISTANCES = ("l2", "cosine")
INITS = ("uniform", "normal")


class VectorQuantizer(Quantizer):
    """Nearest-code vector quantizer with straight-through gradients.

    Losses (unweighted in ``losses``, weighted in ``loss``): ``codebook = mean((z_q - sg[z])^2)`` and
    ``commitment = mean((sg[z_q] - z)^2)``, weighted by ``codebook_weight`` and ``commitment_weight``.

    Args:
        codebook_size: Number of codes K.
        codebook_dim: Channels D of the codes and of the input.
        commitment_weight: beta in front of the commitment term (0.25 as in VQ-VAE and FVQ).
        codebook_weight: Weight of the codebook term.
        distance: ``"l2"`` (squared Euclidean, as FVQ) or ``"cosine"`` (codes and inputs l2-normalised first,
            as LlamaGen's default).
        init: Raw codebook initialisation, ``"uniform"`` on ``[-init_scale, init_scale]`` or ``"normal"`` with std
            ``init_scale``.
        init_scale: Scale of the initialisation; ``None`` means ``1 / codebook_size`` (the published FVQ init).
        projector: Optional module mapping the raw ``(K, D)`` codebook to the ``(K, D)`` codebook used for search and
            lookup (``LinearProjector``, ``MLPProjector``, ``VQBridge``), trained jointly.
        max_chunk_bytes: Memory bound of one distance block in the nearest-code search.
    """

    def __init__(
        self,
        codebook_size: int,
        codebook_dim: int,
        *,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        distance: str = "l2",
        init: str = "uniform",
        init_scale: float | None = None,
        projector: nn.Module | None = None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> None:
        super().__init__()
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        if codebook_dim < 1:
            raise ValueError(f"codebook_dim must be >= 1, got {codebook_dim}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.distance = distance
        self.max_chunk_bytes = max_chunk_bytes
        scale = 1.0 / codebook_size if init_scale is None else init_scale
        weight = torch.empty(codebook_size, codebook_dim)
        if init == "uniform":
            nn.init.uniform_(weight, -scale, scale)
        else:
            nn.init.normal_(weight, std=scale)
        self.codebook = nn.Parameter(weight)  # raw codebook C, (K, D)
        self.projector = projector

    # ----------------------------------------------------------------------------------------------------------------
    def codebook_vectors(self) -> Tensor:
        """The codebook used for search and lookup, ``(K, D)``: ``f(C)`` with a projector, else ``C``."""
        codes = self.codebook if self.projector is None else self.projector(self.codebook)
        if codes.shape != self.codebook.shape:
            raise RuntimeError(
                f"projector must map the ({self.codebook_size}, {self.codebook_dim}) codebook to the same shape, "
                f"got {tuple(codes.shape)}"
            )
        if self.distance == "cosine":
            codes = F.normalize(codes, dim=-1)
        return codes

    def _prepare(self, z: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        flat, grid = channels_last_flat(z, self.codebook_dim)  # (N, D)
        if self.distance == "cosine":
            flat = F.normalize(flat, dim=-1)
        return flat, grid

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(B, D, H, W)`` or ``(N, D)``."""
        flat, grid = self._prepare(z)  # (N, D)
        codes = self.codebook_vectors()  # (K, D)
        indices = nearest_codes(flat, codes, self.max_chunk_bytes)  # (N,)
        z_q = codes.index_select(0, indices).to(flat.dtype)  # (N, D), differentiable w.r.t. the codebook
        losses = {
            "codebook": F.mse_loss(z_q.float(), flat.detach().float()),
            "commitment": F.mse_loss(flat.float(), z_q.detach().float()),
        }
        loss = weighted_total(
            losses, {"codebook": self.codebook_weight, "commitment": self.commitment_weight}, like=flat.float()
        )
        quantized = straight_through(flat, z_q)  # (N, D)
        metrics = batch_code_metrics(indices, self.codebook_size)
        return QuantizerOutput(
            quantized=restore_layout(quantized, grid),
            indices=indices.reshape(grid),
            loss=loss,
            losses=losses,
            metrics=metrics,
        )

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        flat, grid = self._prepare(z)
        return nearest_codes(flat, self.codebook_vectors(), self.max_chunk_bytes).reshape(grid)

    def decode(self, indices: Tensor) -> Tensor:
        check_indices(indices, self.codebook_size)
        codes = self.codebook_vectors()
        flat = codes.index_select(0, indices.reshape(-1).long())  # (N, D)
        grid = tuple(indices.shape)
        if len(grid) == 3:
            return restore_layout(flat, grid)
        return flat.reshape(*grid, self.codebook_dim)

    @torch.no_grad()
    def export(self) -> VectorQuantizer:
        """A plain quantizer holding the mapped codebook ``f(C)``: same indices and outputs, no projector."""
        mapped = self.codebook if self.projector is None else self.projector(self.codebook)
        plain = VectorQuantizer(
            self.codebook_size,
            self.codebook_dim,
            commitment_weight=self.commitment_weight,
            codebook_weight=self.codebook_weight,
            distance=self.distance,
            max_chunk_bytes=self.max_chunk_bytes,
        )
        plain.codebook.data.copy_(mapped.detach())
        return plain.to(self.codebook.device).train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, distance={self.distance!r}, commitment_weight={self.commitment_weight}"


def batch_code_metrics(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Usage and perplexity of one batch of indices, as detached scalars (batch-local, not a set-level figure)."""
    with torch.no_grad():
        counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).float()
        p = counts / counts.sum().clamp_min(1.0)
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
        return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}
