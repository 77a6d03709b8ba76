"""Codebook projectors: modules mapping the raw ``(K, D)`` codebook to the ``(K, D)`` codebook used for search.

A projector is handed to :class:`~fvq.quantizers.vq.VectorQuantizer` (``projector=...``) and trained jointly with the
raw codebook, so every code receives gradient through the shared map, not only the selected ones.

* :class:`IdentityProjector` - no map (plain VQ), for symmetry in configs.
* :class:`LinearProjector` - one shared linear map, as SimVQ (Zhu et al., 2024, https://arxiv.org/abs/2411.02038)
  and VQGAN-LC.
* :class:`MLPProjector` - a stack of linear layers with activations; depth 5 with ReLU is the paper's "MLP-5" baseline
  (the authors' ``QBridge_MLP_5``: five ``Linear(D, D)`` with ReLU between them).
* :class:`~fvq.quantizers.vq_bridge.VQBridge` - the FVQ projector (its own module).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class ProjectorCost:
    """Size and compute of one projector pass over the whole codebook.

    Attributes:
        params: Number of trainable parameters.
        macs: Multiply-accumulates of one pass over the whole codebook (the paper's Table 10 calls these FLOPs).
    """

    params: int
    macs: int


def _check_codebook(codebook: Tensor, dim: int, name: str) -> None:
    if codebook.ndim != 2 or codebook.shape[1] != dim:
        raise ValueError(f"{name} expects a codebook of shape (K, {dim}), got {tuple(codebook.shape)}")


class IdentityProjector(nn.Module):
    """Returns the codebook unchanged."""

    def __init__(self, codebook_dim: int) -> None:
        super().__init__()
        self.codebook_dim = codebook_dim

    def forward(self, codebook: Tensor) -> Tensor:
        _check_codebook(codebook, self.codebook_dim, type(self).__name__)
        return codebook

    def cost(self, codebook_size: int) -> ProjectorCost:
        return ProjectorCost(params=0, macs=0)


class LinearProjector(nn.Module):
    """``f(C) = C W^T (+ b)``: one shared linear map (SimVQ / VQGAN-LC).

    Args:
        codebook_dim: D, the channels of the mapped codebook.
        bias: Whether the map has a bias.
        input_dim: Channels of the raw codebook (default D). VQGAN-LC keeps a frozen codebook of pretrained features of
            their own width and learns this map from it to the encoder's D.

    Shapes: ``(K, input_dim) -> (K, D)``.
    """

    def __init__(self, codebook_dim: int, bias: bool = True, input_dim: int | None = None) -> None:
        super().__init__()
        self.codebook_dim = codebook_dim
        self.input_dim = codebook_dim if input_dim is None else input_dim
        if self.input_dim < 1:
            raise ValueError(f"LinearProjector input_dim must be >= 1, got {input_dim}")
        self.linear = nn.Linear(self.input_dim, codebook_dim, bias=bias)

    def forward(self, codebook: Tensor) -> Tensor:
        _check_codebook(codebook, self.input_dim, type(self).__name__)
        return self.linear(codebook)  # (K, D)

    def cost(self, codebook_size: int) -> ProjectorCost:
        params = sum(p.numel() for p in self.parameters())
        return ProjectorCost(params=params, macs=codebook_size * self.input_dim * self.codebook_dim)


class MLPProjector(nn.Module):
    """A stack of ``depth`` linear layers with an activation between them (the paper's MLP-5 for ``depth=5``).

    The defaults are the MLP-5 baseline as the authors coded it (``QBridge_MLP_5``): five ``Linear(D, D)`` layers
    with PyTorch's default init and ReLU between them. In a config, ``activation`` is a name
    (``relu`` | ``gelu`` | ``silu`` | ``tanh``).

    Args:
        codebook_dim: D (input and output channels).
        depth: Number of linear layers (>= 1).
        hidden_dim: Width of the hidden layers (D by default).
        activation: Activation class inserted between layers (ReLU, the authors' choice).
    """

    def __init__(
        self,
        codebook_dim: int,
        depth: int = 5,
        hidden_dim: int | None = None,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"MLPProjector depth must be >= 1, got {depth}")
        self.codebook_dim = codebook_dim
        hidden = hidden_dim or codebook_dim
        dims = [codebook_dim] + [hidden] * (depth - 1) + [codebook_dim]
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < depth - 1:
                layers.append(activation())
        self.net = nn.Sequential(*layers)

    def forward(self, codebook: Tensor) -> Tensor:
        _check_codebook(codebook, self.codebook_dim, type(self).__name__)
        return self.net(codebook)  # (K, D)

    def cost(self, codebook_size: int) -> ProjectorCost:
        params = sum(p.numel() for p in self.parameters())
        macs = sum(codebook_size * m.in_features * m.out_features for m in self.net if isinstance(m, nn.Linear))
        return ProjectorCost(params=params, macs=macs)
