"""Building blocks of the convolutional autoencoder (the taming-transformers / LlamaGen VQGAN layers).

Esser et al., "Taming Transformers for High-Resolution Image Synthesis", CVPR 2021; Sun et al., "Autoregressive
Model Beats Diffusion: Llama for Scalable Image Generation" (LlamaGen), 2024. Module and attribute names follow
LlamaGen's ``tokenizer/tokenizer_image/vq_model.py`` so that its checkpoints load with a near-identity key mapping.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """Affine ``GroupNorm(num_groups, channels, eps=1e-6)``, as in LlamaGen; clear error when groups do not divide.

    Args:
        channels: Channels to normalise.
        num_groups: Groups (32 in LlamaGen; narrow models need fewer).
    """
    if num_groups < 1 or channels % num_groups:
        raise ValueError(
            f"GroupNorm needs num_groups dividing the channel count: {channels} channels cannot be split into "
            f"{num_groups} groups (set norm_groups to a divisor of every level's width)"
        )
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: ``x + conv(swish(norm(conv(swish(norm(x))))))``.

    A 1x1 ``nin_shortcut`` maps the skip path when the width changes.

    Args:
        in_channels: Input channels.
        out_channels: Output channels (default: ``in_channels``).
        dropout: Dropout before the second convolution.
        num_groups: GroupNorm groups.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int | None = None, *, dropout: float = 0.0, num_groups: int = 32
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
            if in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))  # (B, C_out, H, W)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)  # (B, C_out, H, W)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (1x1 convs for q, k, v and the output).

    Args:
        channels: Channels C (the attention width; one head).
        num_groups: GroupNorm groups.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``; attention over the ``H * W`` positions.
    """

    def __init__(self, channels: int, *, num_groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)  # (B, C, H, W)
        q = self.q(y).flatten(2).transpose(1, 2)[:, None]  # (B, 1, HW, C)
        k = self.k(y).flatten(2).transpose(1, 2)[:, None]  # (B, 1, HW, C)
        v = self.v(y).flatten(2).transpose(1, 2)[:, None]  # (B, 1, HW, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), softmax(q k^T / sqrt(C)) v
        y = y[:, 0].transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    """Halve the resolution: zero-pad right and bottom by one, then a 3x3 convolution with stride 2.

    Shapes: ``(B, C, H, W) -> (B, C, H / 2, W / 2)`` for even ``H`` and ``W``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (B, C, H + 1, W + 1), asymmetric padding
        return self.conv(x)  # (B, C, H / 2, W / 2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2, then a 3x3 convolution.

    Shapes: ``(B, C, H, W) -> (B, C, 2H, 2W)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)  # (B, C, 2H, 2W)
