"""Convolutional encoder and decoder of the VQGAN tokenizer (LlamaGen's VQ-16 / VQ-8 architecture).

Layout (LlamaGen ``vq_model.py``, itself from taming-transformers): ``conv_in`` -> one block per level of
``ch_mult`` (residual blocks, single-head attention after each residual block at the levels in ``attn_levels``,
then a downsample except at the last level) -> middle ``res, attn, res`` -> ``norm_out``, swish, ``conv_out``.
The decoder mirrors it from the lowest resolution up, with ``num_res_blocks`` residual blocks per level (LlamaGen
uses one more than the encoder). Level ``i`` works at ``1 / 2**i`` of the input resolution, so the downsampling
factor is ``2 ** (len(ch_mult) - 1)``; LlamaGen puts attention only at the last (lowest-resolution) level, the
16x16 level for VQ-16 at 256 px.

VAR's VQVAE (Tian et al., 2024, ``models/vqvae.py``) puts a 3x3 convolution ``z_channels -> z_channels`` right before
the quantizer and another right after it. ``latent_conv_kernel_size`` adds them here: ``latent_conv`` is the encoder's
last layer and the decoder's first (absent, and the state dict unchanged, when it is ``None``).

State-dict keys match LlamaGen's: ``conv_in``, ``conv_blocks.{level}.res.{j}``, ``conv_blocks.{level}.attn.{j}``,
``conv_blocks.{level}.downsample.conv`` / ``upsample.conv``, ``mid.{0,1,2}``, ``norm_out``, ``conv_out``. In the
decoder, ``conv_blocks.0`` is the lowest-resolution level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fvq.models.layers import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm


def _check_levels(ch_mult: Sequence[int], attn_levels: Sequence[int] | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ch_mult = tuple(int(m) for m in ch_mult)
    if not ch_mult or any(m < 1 for m in ch_mult):
        raise ValueError(f"ch_mult must be a non-empty sequence of positive integers, got {ch_mult}")
    levels = len(ch_mult)
    attn = (levels - 1,) if attn_levels is None else tuple(int(i) for i in attn_levels)
    bad = [i for i in attn if not 0 <= i < levels]
    if bad:
        raise ValueError(f"attn_levels must be level indices in [0, {levels - 1}] for ch_mult {ch_mult}, got {bad}")
    return ch_mult, attn


def latent_conv(channels: int, kernel_size: int) -> nn.Conv2d:
    """``channels -> channels`` convolution with "same" padding (VAR's ``quant_conv`` / ``post_quant_conv``)."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"latent_conv_kernel_size must be a positive odd int or None, got {kernel_size!r}")
    return nn.Conv2d(channels, channels, kernel_size=kernel_size, stride=1, padding=kernel_size // 2)


class Encoder(nn.Module):
    """Image -> latent feature map.

    Args:
        in_channels: Image channels (3).
        ch: Base width; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: Width multipliers, one per level; ``len(ch_mult) - 1`` downsamplings.
        num_res_blocks: Residual blocks per level (2 in LlamaGen's encoder).
        z_channels: Output channels.
        attn_levels: Levels with attention after every residual block (default: the last level only, as LlamaGen).
        mid_attention: Attention between the two middle residual blocks (LlamaGen: yes).
        norm_groups: GroupNorm groups (32 in LlamaGen); must divide every width.
        dropout: Dropout inside the residual blocks.
        latent_conv_kernel_size: When set, a ``z_channels -> z_channels`` convolution of this (odd) kernel after
            ``conv_out``: VAR's 3x3 ``quant_conv``. ``None`` (LlamaGen): none.

    Shapes: ``(B, in_channels, H, W) -> (B, z_channels, H / f, W / f)`` with ``f = 2 ** (len(ch_mult) - 1)``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        attn_levels: Sequence[int] | None = None,
        mid_attention: bool = True,
        norm_groups: int = 32,
        dropout: float = 0.0,
        latent_conv_kernel_size: int | None = None,
    ) -> None:
        super().__init__()
        ch_mult, attn_levels = _check_levels(ch_mult, attn_levels)
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        self.in_channels = in_channels
        self.z_channels = z_channels
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            block = nn.Module()
            block_out = ch * mult
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                res.append(ResnetBlock(block_in, block_out, dropout=dropout, num_groups=norm_groups))
                block_in = block_out
                if level in attn_levels:
                    attn.append(AttnBlock(block_in, num_groups=norm_groups))
            block.res = res
            block.attn = attn
            if level != self.num_resolutions - 1:
                block.downsample = Downsample(block_in)
            self.conv_blocks.append(block)

        self.mid = nn.ModuleList(
            [
                ResnetBlock(block_in, block_in, dropout=dropout, num_groups=norm_groups),
                AttnBlock(block_in, num_groups=norm_groups) if mid_attention else nn.Identity(),
                ResnetBlock(block_in, block_in, dropout=dropout, num_groups=norm_groups),
            ]
        )
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, stride=1, padding=1)
        if latent_conv_kernel_size is not None:
            self.latent_conv = latent_conv(z_channels, latent_conv_kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level, block in enumerate(self.conv_blocks):
            for j in range(self.num_res_blocks):
                h = block.res[j](h)  # (B, ch * ch_mult[level], H / 2**level, W / 2**level)
                if len(block.attn) > 0:
                    h = block.attn[j](h)
            if level != self.num_resolutions - 1:
                h = block.downsample(h)  # (B, C, H / 2**(level+1), W / 2**(level+1))
        for layer in self.mid:
            h = layer(h)  # (B, C_last, H / f, W / f)
        h = F.silu(self.norm_out(h))  # (B, C_last, H / f, W / f)
        h = self.conv_out(h)  # (B, z_channels, H / f, W / f)
        if hasattr(self, "latent_conv"):
            h = self.latent_conv(h)  # (B, z_channels, H / f, W / f), VAR's quant_conv
        return h


class Decoder(nn.Module):
    """Latent feature map -> image.

    Args:
        out_channels: Image channels (3).
        ch: Base width; level ``i`` has ``ch * ch_mult[i]`` channels.
        ch_mult: Width multipliers, one per level (listed from the full-resolution level down, as the encoder's).
        num_res_blocks: Residual blocks per level (3 in LlamaGen's decoder: the encoder's count plus one).
        z_channels: Input channels.
        attn_levels: Levels with attention after every residual block (default: the last level only).
        mid_attention: Attention between the two middle residual blocks.
        norm_groups: GroupNorm groups; must divide every width.
        dropout: Dropout inside the residual blocks.
        latent_conv_kernel_size: When set, a ``z_channels -> z_channels`` convolution of this (odd) kernel before
            ``conv_in``: VAR's 3x3 ``post_quant_conv``. ``None`` (LlamaGen): none.

    Shapes: ``(B, z_channels, h, w) -> (B, out_channels, h * f, w * f)`` with ``f = 2 ** (len(ch_mult) - 1)``.
    """

    def __init__(
        self,
        *,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 3,
        z_channels: int = 256,
        attn_levels: Sequence[int] | None = None,
        mid_attention: bool = True,
        norm_groups: int = 32,
        dropout: float = 0.0,
        latent_conv_kernel_size: int | None = None,
    ) -> None:
        super().__init__()
        ch_mult, attn_levels = _check_levels(ch_mult, attn_levels)
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        self.out_channels = out_channels
        self.z_channels = z_channels
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.upsample_factor = 2 ** (len(ch_mult) - 1)

        block_in = ch * ch_mult[-1]
        if latent_conv_kernel_size is not None:
            self.latent_conv = latent_conv(z_channels, latent_conv_kernel_size)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.ModuleList(
            [
                ResnetBlock(block_in, block_in, dropout=dropout, num_groups=norm_groups),
                AttnBlock(block_in, num_groups=norm_groups) if mid_attention else nn.Identity(),
                ResnetBlock(block_in, block_in, dropout=dropout, num_groups=norm_groups),
            ]
        )

        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(self.num_resolutions)):
            block = nn.Module()
            block_out = ch * ch_mult[level]
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                res.append(ResnetBlock(block_in, block_out, dropout=dropout, num_groups=norm_groups))
                block_in = block_out
                if level in attn_levels:
                    attn.append(AttnBlock(block_in, num_groups=norm_groups))
            block.res = res
            block.attn = attn
            if level != 0:
                block.upsample = Upsample(block_in)
            self.conv_blocks.append(block)

        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    @property
    def last_layer(self) -> Tensor:
        """Weight of the final convolution, ``(out_channels, C, 3, 3)`` (for the adaptive GAN loss weight)."""
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        if hasattr(self, "latent_conv"):
            z = self.latent_conv(z)  # (B, z_channels, h, w), VAR's post_quant_conv
        h = self.conv_in(z)  # (B, C_last, h, w)
        for layer in self.mid:
            h = layer(h)  # (B, C_last, h, w)
        for i, block in enumerate(self.conv_blocks):  # i = 0 is the lowest resolution
            for j in range(self.num_res_blocks):
                h = block.res[j](h)  # (B, ch * ch_mult[L - 1 - i], h * 2**i, w * 2**i)
                if len(block.attn) > 0:
                    h = block.attn[j](h)
            if i != self.num_resolutions - 1:
                h = block.upsample(h)  # (B, C, h * 2**(i+1), w * 2**(i+1))
        h = F.silu(self.norm_out(h))  # (B, ch * ch_mult[0], h * f, w * f)
        return self.conv_out(h)  # (B, out_channels, h * f, w * f)
