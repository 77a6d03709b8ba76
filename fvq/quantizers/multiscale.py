"""Multi-scale residual quantization of VAR.

Tian et al., "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction", NeurIPS 2024,
https://arxiv.org/abs/2404.02905 . With a :class:`~fvq.quantizers.vq_bridge.VQBridge` projector in the shared
:class:`~fvq.quantizers.vq.VectorQuantizer` this is "FVQ (VAR)" of the FVQ paper (Section 4.4): the bridged codebook
``f(C)`` replaces the embedding in search and lookup.

A ``(B, D, S, S)`` feature map is described by token maps of growing side ``s_1 < ... < s_n = S``. At scale ``k``:
area-downsample the residual to ``s_k x s_k``, take the nearest codes of one shared codebook, upsample the code map
back to ``S x S`` (bicubic), refine it with a convolution ``phi`` (``h <- (1 - r) h + r conv3x3(h)``, ``r =
quant_resi``), add it to the reconstruction and subtract it from the residual.

Index layout: ``indices`` is ``(B, L)`` int64 with ``L = sum_k s_k^2``, the scales concatenated coarse to fine, each
flattened row-major (``split_indices`` / ``merge_indices`` convert to and from per-scale ``(B, s_k, s_k)`` maps).
This is the token sequence a next-scale AR model reads and predicts.

Differences from the published code, on purpose: ids are int64 and the search is the chunked exact fp32
:func:`~fvq.quantizers.search.nearest_codes`, so any codebook size works (theirs breaks at 65,536 codes); every
lookup, including the index helpers for the AR model, uses the mapped codebook ``codebook_vectors()``, never the raw
one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvq.quantizers.base import Quantizer, QuantizerOutput, channels_last_flat, check_indices, weighted_total
from fvq.quantizers.functional import straight_through
from fvq.quantizers.search import nearest_codes
from fvq.quantizers.vq import VectorQuantizer, batch_code_metrics

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """Validate scales: a non-empty, strictly increasing sequence of positive ints."""
    out = tuple(scales)
    if not out or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in out):
        raise ValueError(f"scales must be a non-empty sequence of positive ints, got {scales!r}")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"scales must be strictly increasing (coarse to fine), got {scales!r}")
    return out


class Phi(nn.Module):
    """VAR's residual refinement: ``h -> (1 - r) h + r conv3x3(h)`` on ``(B, D, H, W)``."""

    def __init__(self, dim: int, ratio: float, kernel_size: int = 3) -> None:
        super().__init__()
        self.ratio = abs(ratio)
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2)

    def forward(self, h: Tensor) -> Tensor:
        return h * (1 - self.ratio) + self.conv(h) * self.ratio


def phi_ticks(num_phi: int) -> np.ndarray:
    """Positions in [0, 1] of the shared phi convs along the scale axis (VAR's ``PhiPartiallyShared``)."""
    k = num_phi
    return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


class MultiScaleResidualQuantizer(Quantizer):
    """VAR's multi-scale residual quantizer around one shared :class:`VectorQuantizer`.

    Losses (VAR): at each scale ``k``, with ``f_hat_k`` the reconstruction after ``k`` scales,
    ``codebook += mse(f_hat_k, sg[z])`` (trains the codebook, its projector and the phi convs) and
    ``commitment += mse(sg[f_hat_k], z)``; both averaged over scales and weighted by the inner quantizer's
    ``codebook_weight`` / ``commitment_weight``. The output ``quantized`` is ``f_hat_n`` with a straight-through
    gradient to ``z``. Only the inner quantizer's codebook, projector and distance are used (its own forward and any
    training-time codebook update rule it has are not run).

    Args:
        quantizer: The shared codebook (any projector, e.g. a VQBridge, composes).
        scales: Token-map sides, strictly increasing; the last must equal the input's spatial side.
        quant_resi: Ratio ``r`` of the phi refinement (0.5 in VAR; 0 disables phi).
        num_phi: Number of shared phi convs (default ``min(4, len(scales))``; 4 in VAR), picked per scale by the
            nearest tick to ``k / (n - 1)``;
            ``num_phi = len(scales)`` gives one conv per scale, 1 a single shared conv.
        phi_kernel_size: Kernel of the phi convs (3).

    Shapes: input ``(B, D, S, S)`` with ``S = scales[-1]``; indices ``(B, sum_k s_k^2)``.
    """

    codes_per_position = 1
    index_shape = "(B, L)"  # the scales' token maps flattened and concatenated, coarsest first

    def __init__(
        self,
        quantizer: VectorQuantizer,
        *,
        scales: Sequence[int] = VAR_SCALES,
        quant_resi: float = 0.5,
        num_phi: int | None = None,
        phi_kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if not isinstance(quantizer, VectorQuantizer):
            raise TypeError(
                f"MultiScaleResidualQuantizer needs a VectorQuantizer (an explicit codebook), got "
                f"{type(quantizer).__name__}"
            )
        self.scales = check_scales(scales)
        num_phi = min(4, len(self.scales)) if num_phi is None else num_phi
        if not 1 <= num_phi <= len(self.scales):
            raise ValueError(f"num_phi must be in [1, {len(self.scales)}] (number of scales), got {num_phi}")
        if phi_kernel_size < 1 or phi_kernel_size % 2 == 0:
            raise ValueError(f"phi_kernel_size must be a positive odd int, got {phi_kernel_size}")
        self.quantizer = quantizer
        self.codebook_dim = quantizer.codebook_dim
        self.codebook_size = quantizer.codebook_size
        self.quant_resi = quant_resi
        self.num_phi = num_phi
        self.phi_kernel_size = phi_kernel_size
        self.side = self.scales[-1]
        self.num_tokens = sum(s * s for s in self.scales)
        if abs(quant_resi) > 1e-6:
            self.phis = nn.ModuleList(Phi(self.codebook_dim, quant_resi, phi_kernel_size) for _ in range(num_phi))
        else:
            self.phis = nn.ModuleList()
        ticks = phi_ticks(num_phi)
        n = len(self.scales)
        self._phi_of_scale = [int(np.argmin(np.abs(ticks - (k / (n - 1) if n > 1 else 0.0)))) for k in range(n)]

    # ----------------------------------------------------------------------------------------------------------------
    def phi(self, k: int, h: Tensor) -> Tensor:
        """Apply the phi conv of scale ``k`` to ``h`` ``(B, D, S, S)`` (identity when ``quant_resi == 0``)."""
        return self.phis[self._phi_of_scale[k]](h) if len(self.phis) else h

    def _check_map(self, z: Tensor) -> None:
        channels_last_flat(z, self.codebook_dim)  # rank, channels, dtype, finite
        if z.ndim != 4 or z.shape[2] != self.side or z.shape[3] != self.side:
            raise ValueError(
                f"MultiScaleResidualQuantizer expects a (B, {self.codebook_dim}, {self.side}, {self.side}) feature "
                f"map (last scale {self.side}), got shape {tuple(z.shape)}"
            )

    def _upsample(self, h: Tensor) -> Tensor:
        """``(B, D, s, s)`` -> ``(B, D, S, S)``, bicubic as VAR (identity at the last scale)."""
        if h.shape[-1] == self.side:
            return h
        return F.interpolate(h, size=(self.side, self.side), mode="bicubic")

    def _downsample(self, f: Tensor, s: int) -> Tensor:
        """``(B, D, S, S)`` -> ``(B, D, s, s)`` by area averaging (identity at the last scale)."""
        if s == self.side:
            return f
        return F.interpolate(f, size=(s, s), mode="area")

    def _lookup(self, codes: Tensor, idx: Tensor, s: int) -> Tensor:
        """Ids ``(B, s*s)`` -> code map ``(B, D, s, s)`` from the mapped codebook ``codes`` ``(K, D)``."""
        b = idx.shape[0]
        h = codes.index_select(0, idx.reshape(-1))  # (B*s*s, D)
        return h.reshape(b, s, s, self.codebook_dim).permute(0, 3, 1, 2)  # (B, D, s, s)

    def _search(self, codes: Tensor, rest: Tensor, s: int) -> Tensor:
        """Nearest code ids ``(B, s*s)`` of the residual ``rest`` ``(B, D, S, S)`` downsampled to ``s x s``."""
        r = self._downsample(rest, s)  # (B, D, s, s)
        flat = r.permute(0, 2, 3, 1).reshape(-1, self.codebook_dim)  # (B*s*s, D)
        if self.quantizer.distance == "cosine":
            flat = F.normalize(flat, dim=-1)
        idx = nearest_codes(flat, codes, self.quantizer.max_chunk_bytes)  # (B*s*s,)
        return idx.reshape(rest.shape[0], s * s)

    def _run(self, z: Tensor, with_losses: bool) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
        """The VAR loop. Returns ``f_hat`` ``(B, D, S, S)`` fp32, per-scale ids ``[(B, s*s)]`` and the losses."""
        f = z.float()  # (B, D, S, S); fp32 as VAR
        f_nograd = f.detach()
        rest = f_nograd.clone()  # (B, D, S, S)
        f_hat = torch.zeros_like(f_nograd)  # (B, D, S, S)
        codes = self.quantizer.codebook_vectors().float()  # (K, D), the mapped codebook, computed once
        ids, codebook_terms, commit_terms = [], [], []
        for k, s in enumerate(self.scales):
            idx = self._search(codes.detach(), rest, s)  # (B, s*s)
            h = self.phi(k, self._upsample(self._lookup(codes, idx, s)))  # (B, D, S, S)
            f_hat = f_hat + h
            rest = rest - h.detach()
            ids.append(idx)
            if with_losses:
                codebook_terms.append(F.mse_loss(f_hat, f_nograd))
                commit_terms.append(F.mse_loss(f_hat.detach(), f))
        losses = {}
        if with_losses:
            losses = {"codebook": torch.stack(codebook_terms).mean(), "commitment": torch.stack(commit_terms).mean()}
        return f_hat, ids, losses

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``(B, D, S, S)``; ``indices`` ``(B, sum_k s_k^2)``."""
        self._check_map(z)
        f_hat, ids, losses = self._run(z, with_losses=True)
        indices = torch.cat(ids, dim=1)  # (B, L)
        loss = weighted_total(
            losses,
            {"codebook": self.quantizer.codebook_weight, "commitment": self.quantizer.commitment_weight},
            like=f_hat,
        )
        metrics = batch_code_metrics(indices, self.codebook_size)
        for k, idx in enumerate(ids):
            metrics[f"scale{k}/usage"] = batch_code_metrics(idx, self.codebook_size)["usage"]
        return QuantizerOutput(
            quantized=straight_through(z, f_hat.to(z.dtype)), indices=indices, loss=loss, losses=losses, metrics=metrics
        )

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """Indices ``(B, sum_k s_k^2)`` of ``z`` ``(B, D, S, S)``."""
        self._check_map(z)
        return torch.cat(self._run(z, with_losses=False)[1], dim=1)

    def decode(self, indices: Tensor) -> Tensor:
        """Indices ``(B, sum_k s_k^2)`` (or a list of per-scale maps) -> ``(B, D, S, S)``."""
        per_scale = self.split_indices(indices) if isinstance(indices, Tensor) else list(indices)
        if len(per_scale) != len(self.scales):
            raise ValueError(f"expected token maps for {len(self.scales)} scales, got {len(per_scale)}")
        codes = self.quantizer.codebook_vectors().float()  # (K, D)
        f_hat = None
        for k, (s, idx) in enumerate(zip(self.scales, per_scale)):
            check_indices(idx, self.codebook_size, name=f"indices of scale {k}")
            h = self.phi(k, self._upsample(self._lookup(codes, idx.reshape(idx.shape[0], s * s).long(), s)))
            f_hat = torch.zeros_like(h) + h if f_hat is None else f_hat + h
        return f_hat

    # ----------------------------------------------------------------------------------------------------------------
    # index helpers for a next-scale AR model
    def split_indices(self, indices: Tensor) -> list[Tensor]:
        """``(B, sum_k s_k^2)`` -> per-scale token maps ``[(B, s_k, s_k)]``, coarse to fine."""
        if not isinstance(indices, Tensor) or indices.ndim != 2 or indices.shape[1] != self.num_tokens:
            shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"indices must be (B, {self.num_tokens}) for scales {self.scales}, got {shape}")
        parts = torch.split(indices, [s * s for s in self.scales], dim=1)
        return [p.reshape(p.shape[0], s, s) for p, s in zip(parts, self.scales)]

    def merge_indices(self, per_scale: Sequence[Tensor]) -> Tensor:
        """Per-scale token maps ``[(B, s_k, s_k)]`` or ``[(B, s_k^2)]`` -> ``(B, sum_k s_k^2)``."""
        if len(per_scale) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} token maps, got {len(per_scale)}")
        return torch.cat([t.reshape(t.shape[0], -1) for t in per_scale], dim=1)

    def next_scale_input(self, k: int, f_hat: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """One step of next-scale generation (VAR's ``get_next_autoregressive_input``).

        Args:
            k: Index of the scale whose tokens were just produced.
            f_hat: Reconstruction so far, ``(B, D, S, S)`` (zeros before scale 0).
            tokens: Ids of scale ``k``, ``(B, s_k, s_k)`` or ``(B, s_k^2)``.

        Returns:
            ``(f_hat, next_input)``: the updated reconstruction ``(B, D, S, S)`` and the input of scale ``k + 1``,
            ``f_hat`` area-downsampled to ``(B, D, s_{k+1}, s_{k+1})`` (``f_hat`` itself after the last scale).
        """
        s = self.scales[k]
        check_indices(tokens, self.codebook_size, name="tokens")
        codes = self.quantizer.codebook_vectors().float()
        f_hat = f_hat + self.phi(k, self._upsample(self._lookup(codes, tokens.reshape(tokens.shape[0], s * s), s)))
        if k == len(self.scales) - 1:
            return f_hat, f_hat
        return f_hat, self._downsample(f_hat, self.scales[k + 1])

    def indices_to_next_scale_inputs(self, indices: Tensor | Sequence[Tensor]) -> Tensor:
        """Teacher-forcing inputs of a next-scale AR model (VAR's ``idxBl_to_var_input``).

        Args:
            indices: ``(B, sum_k s_k^2)`` or per-scale maps.

        Returns:
            ``(B, sum_{k>=1} s_k^2, D)``: for each scale ``k >= 1``, the reconstruction from scales ``< k``
            area-downsampled to ``s_k x s_k``, flattened row-major, concatenated coarse to fine.
        """
        per_scale = self.split_indices(indices) if isinstance(indices, Tensor) else list(indices)
        b = per_scale[0].shape[0]
        f_hat = torch.zeros(b, self.codebook_dim, self.side, self.side, device=per_scale[0].device)
        inputs = []
        for k in range(len(self.scales) - 1):
            f_hat, nxt = self.next_scale_input(k, f_hat, per_scale[k])  # nxt: (B, D, s_{k+1}, s_{k+1})
            inputs.append(nxt.flatten(2).transpose(1, 2))  # (B, s_{k+1}^2, D)
        if not inputs:
            return f_hat.new_zeros(b, 0, self.codebook_dim)
        return torch.cat(inputs, dim=1)

    @torch.no_grad()
    def export(self) -> MultiScaleResidualQuantizer:
        """Same quantizer with the projector folded into a plain codebook; phi convs copied."""
        exported = MultiScaleResidualQuantizer(
            self.quantizer.export(),
            scales=self.scales,
            quant_resi=self.quant_resi,
            num_phi=self.num_phi,
            phi_kernel_size=self.phi_kernel_size,
        )
        exported.phis.load_state_dict(self.phis.state_dict())
        return exported.to(next(self.quantizer.parameters()).device).train(self.training)

    def extra_repr(self) -> str:
        return (
            f"scales={self.scales}, tokens={self.num_tokens}, codebook_size={self.codebook_size}, "
            f"codebook_dim={self.codebook_dim}, quant_resi={self.quant_resi}, num_phi={self.num_phi}"
        )
