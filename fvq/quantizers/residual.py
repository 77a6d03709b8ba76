"""Residual quantization: a stack of quantizers, each quantizing what the previous ones left.

RQ-VAE: Lee et al., "Autoregressive Image Generation using Residual Quantization", CVPR 2022,
https://arxiv.org/abs/2203.01941 ; quantizer dropout as in SoundStream (Zeghidour et al., 2021,
https://arxiv.org/abs/2107.03312). With one shared :class:`~fvq.quantizers.vq.VectorQuantizer` holding a
:class:`~fvq.quantizers.vq_bridge.VQBridge` projector this is "FVQ (RQ-VAE)" of the FVQ paper (Section 4.4: 4 depths
sharing one bridged codebook, losses averaged over depths).

``r_0 = z``; for depth ``d``: ``q_d = Q_d(r_{d-1})``, ``r_d = r_{d-1} - sg[q_d]``; the output is ``sum_d q_d`` with a
straight-through gradient to ``z``. Each depth's commitment term ``||r_{d-1} - sg[q_d]||^2 = ||z - sg[Q_d]||^2``
(``Q_d = sum_{j<=d} q_j``) trains the encoder.

The codebook term has two forms (``codebook_loss``):

* ``"cumulative"`` (default; RQ-VAE's and the FVQ authors' form): ``mean_d ||Q_d - sg[z]||^2``. The partial sum
  ``Q_d`` is differentiable in every code it contains, so the codes of depth ``j`` also learn from the errors left at
  every later depth ``d >= j``.
* ``"per_depth"``: ``mean_d ||q_d - sg[r_{d-1}]||^2``, each depth's own VQ codebook term; a code learns only from the
  depth that chose it.

Both give the same gradient to the encoder and the same value at depth 0; the commitment term is the same in both
(the authors' ``||sg[Q_d] - z||^2`` equals each depth's commitment to its residual).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvq.quantizers.base import Quantizer, QuantizerOutput, channels_last_flat, restore_layout
from fvq.quantizers.functional import straight_through

DROPPED_INDEX = -1
CODEBOOK_LOSSES = ("cumulative", "per_depth")


def _check_sub_quantizers(quantizers: Sequence[Quantizer], owner: str) -> tuple[int, int]:
    """Sub-quantizers must be single-code quantizers of one ``codebook_dim`` and ``codebook_size``."""
    for i, q in enumerate(quantizers):
        if not isinstance(q, Quantizer):
            raise TypeError(f"{owner}: quantizer {i} must be a fvq Quantizer, got {type(q).__name__}")
        if q.codes_per_position != 1:
            raise ValueError(
                f"{owner}: quantizer {i} ({type(q).__name__}) emits {q.codes_per_position} codes per position; "
                "nest only single-code quantizers"
            )
    dims = {q.codebook_dim for q in quantizers}
    sizes = {q.codebook_size for q in quantizers}
    if len(dims) != 1:
        raise ValueError(f"{owner}: all quantizers must share codebook_dim, got {sorted(dims)}")
    if len(sizes) != 1:
        raise ValueError(f"{owner}: all quantizers must share codebook_size, got {sorted(sizes)}")
    return dims.pop(), sizes.pop()


class ResidualQuantizer(Quantizer):
    """Residual quantizer over ``num_quantizers`` depths, with shared or per-depth codebooks.

    Args:
        quantizer: One quantizer, reused at every depth (``shared``: one codebook; a VQBridge inside it is run once per
            depth on the same raw codebook), or a sequence of per-depth quantizers.
        num_quantizers: Number of depths when ``quantizer`` is a single module (required then); must equal
            ``len(quantizer)`` when a sequence is given.
        quantizer_dropout: Probability that a training batch uses only the first ``n ~ U{1..num_quantizers}``
            depths (SoundStream's quantizer dropout, drawn once per batch so one model serves several bitrates).
            The indices of the depths not run are ``-1`` in that batch's output. Never applied in eval mode.
        dropout_seed: Seed of the dropout draws. They come from a generator of this module that :meth:`set_step`
            reseeds from ``(dropout_seed, step)``: every rank draws the same depth (ranks must run the same
            collectives and report the same metrics) and a resumed run draws what the uninterrupted one drew.
        codebook_loss: ``"cumulative"`` (default, RQ-VAE and the FVQ authors) or ``"per_depth"``; see the module
            docstring. Applies to depths whose quantizer has a ``codebook`` loss term (gradient-trained VQ codebooks);
            the cumulative form computes each such depth's mapped codebook once more per forward pass (once per
            module when shared), to take the partial sums differentiably.

    Outputs: ``indices`` ``(B, H, W, num_quantizers)`` or ``(N, num_quantizers)``; ``losses`` and ``loss`` are the
    means over the depths run of each depth's terms; ``metrics`` hold ``depth{d}/usage``, ``depth{d}/perplexity`` and
    ``depth{d}/residual`` (mean squared norm per channel of the residual left after depth ``d``), plus their means
    over depths as ``usage`` and ``perplexity``.

    :meth:`decode` accepts the first ``n <= num_quantizers`` depths (``indices[..., :n]``), the coarse reconstruction
    of progressive decoding.
    """

    def __init__(
        self,
        quantizer: Quantizer | Sequence[Quantizer],
        *,
        num_quantizers: int | None = None,
        quantizer_dropout: float = 0.0,
        dropout_seed: int = 0,
        codebook_loss: str = "cumulative",
    ) -> None:
        super().__init__()
        if codebook_loss not in CODEBOOK_LOSSES:
            raise ValueError(f"codebook_loss must be one of {CODEBOOK_LOSSES}, got {codebook_loss!r}")
        if isinstance(quantizer, Quantizer):
            if num_quantizers is None or num_quantizers < 1:
                raise ValueError(f"num_quantizers must be >= 1 with one shared quantizer, got {num_quantizers}")
            layers = [quantizer]
            self.shared = True
        else:
            layers = list(quantizer)
            if not layers:
                raise ValueError("ResidualQuantizer needs at least one quantizer")
            if num_quantizers is not None and num_quantizers != len(layers):
                raise ValueError(f"num_quantizers={num_quantizers} but {len(layers)} quantizers were given")
            num_quantizers = len(layers)
            self.shared = False
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must be in [0, 1], got {quantizer_dropout}")
        self.codebook_dim, self.codebook_size = _check_sub_quantizers(layers, "ResidualQuantizer")
        self.layers = nn.ModuleList(layers)
        self.num_quantizers = num_quantizers
        self.codes_per_position = num_quantizers
        self.quantizer_dropout = quantizer_dropout
        self.dropout_seed = int(dropout_seed)
        self.codebook_loss = codebook_loss
        self._dropout_generator = torch.Generator().manual_seed(self.dropout_seed)

    def quantizer_at(self, depth: int) -> Quantizer:
        """The quantizer used at ``depth`` (the same module at every depth when shared)."""
        return self.layers[0 if self.shared else depth]

    def set_step(self, step: int) -> None:
        """Reseed the dropout draws from ``(dropout_seed, step)`` (see the class docstring), then tell the depths."""
        super().set_step(step)
        self._dropout_generator.manual_seed(self.dropout_seed * 1_000_003 + step)

    @property
    def may_leave_parameters_unused(self) -> bool:
        """Per-depth codebooks of the depths a dropped batch does not run get no gradient."""
        return (not self.shared and self.quantizer_dropout > 0) or super().may_leave_parameters_unused

    def _active_depths(self) -> int:
        if not (self.training and self.quantizer_dropout > 0):
            return self.num_quantizers
        # a CPU generator: the draw never waits for an accelerator
        draw = torch.rand((), generator=self._dropout_generator)
        depth = torch.randint(1, self.num_quantizers + 1, (), generator=self._dropout_generator)
        return int(depth) if float(draw) < self.quantizer_dropout else self.num_quantizers

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` of shape ``(B, D, H, W)`` or ``(N, D)`` with ``num_quantizers`` codes per position."""
        _, grid = channels_last_flat(z, self.codebook_dim)  # validates z
        depths = self._active_depths()
        residual = z  # (B, D, H, W) or (N, D)
        total = torch.zeros_like(z)
        indices, losses_per_depth, loss_sum = [], [], z.new_zeros((), dtype=torch.float32)
        metrics: dict[str, Tensor] = {}
        cumulative = self.codebook_loss == "cumulative"
        partial: Tensor | None = None  # Q_d = sum_{j<=d} q_j, differentiable in the codebooks (cumulative form only)
        mapped: dict[int, Tensor] = {}  # mapped codebook per module, computed once per forward when it has a projector
        for d in range(depths):
            layer = self.quantizer_at(d)
            out = layer(residual)
            q = out.quantized.detach()  # value of this depth; its gradient path is the depth's own losses
            total = total + q
            residual = residual - q  # keeps the gradient to z for the next depth's commitment term
            indices.append(out.indices)
            losses, loss = out.losses, out.loss
            if cumulative and "codebook" in losses and hasattr(layer, "codebook_vectors"):
                q_d = self._differentiable_codes(layer, out.indices, mapped)  # like z
                partial = q_d if partial is None else partial + q_d  # (B, D, H, W) or (N, D)
                own = losses["codebook"]
                losses = {**losses, "codebook": F.mse_loss(partial.float(), z.detach().float())}
                loss = loss + getattr(layer, "codebook_weight", 1.0) * (losses["codebook"] - own)
            elif cumulative:
                partial = q if partial is None else partial + q
            losses_per_depth.append(losses)
            loss_sum = loss_sum + loss
            for key, value in out.metrics.items():
                metrics[f"depth{d}/{key}"] = value
            metrics[f"depth{d}/residual"] = residual.detach().float().square().mean()
        for _ in range(depths, self.num_quantizers):
            indices.append(torch.full_like(indices[0], DROPPED_INDEX))
        losses = {
            name: torch.stack([terms[name] for terms in losses_per_depth if name in terms]).mean()
            for name in dict.fromkeys(k for terms in losses_per_depth for k in terms)
        }
        for key in ("usage", "perplexity"):
            values = [metrics[f"depth{d}/{key}"] for d in range(depths) if f"depth{d}/{key}" in metrics]
            if values:
                metrics[key] = torch.stack(values).float().mean()
        return QuantizerOutput(
            quantized=straight_through(z, total),
            indices=torch.stack(indices, dim=-1),  # (..., num_quantizers)
            loss=loss_sum / depths,
            losses=losses,
            metrics=metrics,
        )

    @staticmethod
    def _differentiable_codes(layer: Quantizer, indices: Tensor, mapped: dict[int, Tensor]) -> Tensor:
        """``q_d`` looked up in ``layer``'s mapped codebook with its graph, laid out like the input.

        The mapped codebook is taken after the depth's forward pass (after any k-means init or restart, which happen
        before its search). With a projector nothing writes the raw codebook during a forward pass, so it is computed
        once per module and reused by the later depths of a shared codebook; without one it is the cheap raw codebook.
        """
        key = id(layer)
        if getattr(layer, "projector", None) is None or key not in mapped:
            mapped[key] = layer.codebook_vectors()  # (K, D)
        codes = mapped[key]
        flat = codes.index_select(0, indices.reshape(-1))  # (N, D)
        return restore_layout(flat, tuple(indices.shape))

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """Indices ``(B, H, W, num_quantizers)`` or ``(N, num_quantizers)`` of ``z``."""
        channels_last_flat(z, self.codebook_dim)
        residual = z
        indices = []
        for d in range(self.num_quantizers):
            layer = self.quantizer_at(d)
            idx = layer.encode(residual)
            residual = residual - layer.decode(idx)
            indices.append(idx)
        return torch.stack(indices, dim=-1)

    def decode(self, indices: Tensor) -> Tensor:
        """Sum of the codes of the first ``n`` depths, ``indices`` ``(..., n)`` with ``1 <= n <= num_quantizers``."""
        if not isinstance(indices, Tensor) or indices.ndim < 2:
            raise ValueError(
                f"indices must be (B, H, W, n) or (N, n) with n <= {self.num_quantizers} depths, got "
                f"{tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__}"
            )
        n = indices.shape[-1]
        if not 1 <= n <= self.num_quantizers:
            raise ValueError(f"indices must have 1..{self.num_quantizers} depths on the last axis, got {n}")
        total = None
        for d in range(n):
            q = self.quantizer_at(d).decode(indices[..., d])
            total = torch.zeros_like(q) + q if total is None else total + q
        return total

    @torch.no_grad()
    def export(self) -> ResidualQuantizer:
        """Same quantizer with every depth exported (projectors folded); a shared codebook stays shared."""
        layers = [layer.export() for layer in self.layers]
        exported = ResidualQuantizer(
            layers[0] if self.shared else layers,
            num_quantizers=self.num_quantizers,
            quantizer_dropout=self.quantizer_dropout,
            dropout_seed=self.dropout_seed,
            codebook_loss=self.codebook_loss,
        )
        return exported.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"num_quantizers={self.num_quantizers}, shared={self.shared}, codebook_size={self.codebook_size}, "
            f"codebook_dim={self.codebook_dim}, quantizer_dropout={self.quantizer_dropout}, "
            f"codebook_loss={self.codebook_loss!r}"
        )
