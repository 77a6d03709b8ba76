"""VQBridge: the codebook projector of FVQ.

Chang et al., "Scalable Training for Vector-Quantized Networks with 100% Codebook Utilization", ICLR 2026
(https://github.com/yfChang-cv/FVQ). Section 3.2: compress -> process -> recover.

1. *Compress*: view the ``(K, D)`` codebook as ``K / g`` groups of ``g`` consecutive code vectors and map each group
   (flattened to ``g * D``) to one token of width ``hidden_dim`` with a shared linear map.
2. *Process*: ``depth`` pre-norm ViT blocks over the ``K / g`` tokens (global interaction between all codes).
3. *Recover*: a norm, a shared linear map back to ``g * D`` and a reshape to ``(K, D)``.

Defaults follow the published code: non-affine LayerNorms (eps 1e-6), tanh-GELU, qkv bias, MLP ratio 2, 4 heads,
xavier-uniform init with zero biases and a zero-initialised expansion (the bridge outputs 0 at step 0). Options: the
LayerNorm after compression that the paper's text (eq. 8) describes, the DiT-block variant (adaLN modulation from one
learned constant vector, zero-initialised gates, fixed sin-cos position embedding) that the released checkpoints use,
and a non-zero expansion init.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fvq.quantizers.projectors import ProjectorCost, _check_codebook

BLOCK_TYPES = ("vit", "dit")
EXPAND_INITS = ("zeros", "xavier")


MAX_DEFAULT_GROUP_SIZE = 64


def default_group_size(codebook_size: int) -> int:
    """Code vectors per bridge token when none is given: ``K / 1,024`` (1,024 tokens), capped at 64.

    The paper's group-size ablation (Section 4.3, Figure 6 right) finds 4 codes per group best at K = 4,096 and 16 at
    K = 16,384, and scales the group with the codebook (x4 per x4 in K); the published configurations use 64 at
    K = 65,536 and keep 64 at K = 262,144 (4,096 tokens), which the cap reproduces. So: 4,096 -> 4, 16,384 -> 16,
    65,536 -> 64, 262,144 -> 64. Smaller codebooks get groups of 1 (K tokens, at most 1,024). The value is the largest
    power of two not above that target which divides K, so any K gets a valid group; pass ``group_size`` to choose.
    """
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    target = min(MAX_DEFAULT_GROUP_SIZE, max(1, codebook_size // 1024))
    group = 1 << (target.bit_length() - 1)  # largest power of two <= target
    while codebook_size % group:
        group //= 2
    return group


def sincos_embedding(num_tokens: int, dim: int) -> Tensor:
    """Fixed sin-cos position embedding ``(num_tokens, dim)``: 2D over a square grid when ``num_tokens`` is a
    perfect square (as the DiT bridge lays the codebook out), 1D otherwise."""
    side = math.isqrt(num_tokens)

    def one_d(pos: Tensor, d: int) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.double()[:, None] * omega[None]  # (T, d/2)
        return torch.cat([out.sin(), out.cos()], dim=1)

    if side * side == num_tokens and dim % 4 == 0:
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        emb = torch.cat([one_d(ys.reshape(-1), dim // 2), one_d(xs.reshape(-1), dim // 2)], dim=1)
    else:
        emb = one_d(torch.arange(num_tokens), dim - dim % 2)
        if dim % 2:
            emb = F.pad(emb, (0, 1))
    return emb.float()


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)  # (B, T, 3, h, d/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, h, T, d/h)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, d/h)
        x = x.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class BridgeBlock(nn.Module):
    """Pre-norm transformer block; with ``modulated=True`` a DiT block (adaLN-Zero) driven by a conditioning vector.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width over ``dim``.
        modulated: DiT-style adaLN modulation (shift, scale, gate for attention and MLP) from ``cond``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, modulated: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) if modulated else None

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        if self.modulation is None:
            x = x + self.attn(self.norm1(x))  # (B, T, D)
            return x + self.mlp(self.norm2(x))  # (B, T, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, dim=-1)  # (B, 1, D)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class VQBridge(nn.Module):
    """The FVQ codebook projector: ``(K, D)`` raw codebook -> ``(K, D)`` mapped codebook.

    Args:
        codebook_size: K; must be divisible by ``group_size``.
        codebook_dim: D.
        group_size: Code vectors compressed into one token (default :func:`default_group_size`: K / 1,024 capped at
            64, i.e. 4 at K = 4,096, 16 at 16,384, 64 at 65,536 and 262,144).
        hidden_dim: Token width d' of the ViT blocks (256).
        depth: Number of blocks (2).
        num_heads: Attention heads (4).
        mlp_ratio: MLP width over ``hidden_dim`` (2.0).
        block: ``"vit"`` (plain pre-norm ViT blocks, the paper's method) or ``"dit"`` (adaLN blocks driven by one
            learned constant vector plus a fixed sin-cos position embedding, as the released checkpoints).
        compress_norm: Apply the LayerNorm after compression of the paper's eq. 8 (the published code has none).
        expand_init: ``"zeros"`` (published: the bridge outputs 0 at step 0) or ``"xavier"``.
        expand_gain: Gain of the xavier init of the expansion (``expand_init="xavier"`` only). A small gain keeps
            the mapped codes near 0 at step 0, as the zero init does, while making them all distinct.

    Shapes: input and output ``(K, D)``; internally ``(1, K / group_size, hidden_dim)`` tokens.
    """

    def __init__(
        self,
        codebook_size: int,
        codebook_dim: int,
        group_size: int | None = None,
        hidden_dim: int = 256,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        block: str = "vit",
        compress_norm: bool = False,
        expand_init: str = "zeros",
        expand_gain: float = 1.0,
    ) -> None:
        super().__init__()
        group_size = default_group_size(codebook_size) if group_size is None else group_size
        if group_size < 1 or codebook_size % group_size:
            raise ValueError(
                f"VQBridge needs codebook_size divisible by group_size: {codebook_size} codes cannot be split into "
                f"groups of {group_size} (choose a group_size that divides {codebook_size})"
            )
        if block not in BLOCK_TYPES:
            raise ValueError(f"block must be one of {BLOCK_TYPES}, got {block!r}")
        if expand_init not in EXPAND_INITS:
            raise ValueError(f"expand_init must be one of {EXPAND_INITS}, got {expand_init!r}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.group_size = group_size
        self.num_tokens = codebook_size // group_size
        self.hidden_dim = hidden_dim
        self.block = block
        modulated = block == "dit"

        self.compress = nn.Linear(group_size * codebook_dim, hidden_dim)
        self.compress_norm = nn.LayerNorm(hidden_dim, eps=1e-6) if compress_norm else nn.Identity()
        self.blocks = nn.ModuleList(BridgeBlock(hidden_dim, num_heads, mlp_ratio, modulated) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.expand = nn.Linear(hidden_dim, group_size * codebook_dim)
        if modulated:
            self.cond = nn.Parameter(torch.randn(1, hidden_dim) * 0.02)  # the one learned constant vector
            self.register_buffer("pos_embed", sincos_embedding(self.num_tokens, hidden_dim)[None], persistent=False)
            self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim))
        else:
            self.cond = None
            self.pos_embed = None
            self.final_modulation = None
        if expand_gain <= 0:
            raise ValueError(f"expand_gain must be > 0, got {expand_gain}")
        self._init_weights(expand_init, expand_gain)

    def _init_weights(self, expand_init: str, expand_gain: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if self.block == "dit":  # adaLN-Zero: modulations start at zero, so every gate is closed at step 0
            for blk in self.blocks:
                nn.init.zeros_(blk.modulation[-1].weight)
                nn.init.zeros_(blk.modulation[-1].bias)
            nn.init.zeros_(self.final_modulation[-1].weight)
            nn.init.zeros_(self.final_modulation[-1].bias)
        if expand_init == "xavier":
            nn.init.xavier_uniform_(self.expand.weight, gain=expand_gain)
        if expand_init == "zeros":
            nn.init.zeros_(self.expand.weight)
            nn.init.zeros_(self.expand.bias)

    def forward(self, codebook: Tensor) -> Tensor:
        _check_codebook(codebook, self.codebook_dim, "VQBridge")
        if codebook.shape[0] != self.codebook_size:
            raise ValueError(f"VQBridge was built for {self.codebook_size} codes, got {codebook.shape[0]}")
        k, d, g = self.codebook_size, self.codebook_dim, self.group_size
        x = codebook.reshape(1, k // g, g * d)  # (1, T, g*D)   1D patchify
        x = self.compress_norm(self.compress(x))  # (1, T, d')
        cond = None
        if self.block == "dit":
            x = x + self.pos_embed.to(x.dtype)  # (1, T, d')
            cond = self.cond  # (1, d')
        for blk in self.blocks:
            x = blk(x, cond)  # (1, T, d')
        x = self.norm(x)  # (1, T, d')
        if self.final_modulation is not None:
            shift, scale = self.final_modulation(cond)[:, None].chunk(2, dim=-1)  # (1, 1, d')
            x = x * (1 + scale) + shift
        x = self.expand(x)  # (1, T, g*D)
        return x.reshape(k, d)  # (K, D)   unpatchify

    def cost(self, codebook_size: int | None = None) -> ProjectorCost:
        """Parameters and MACs of one pass over the codebook (attention products included)."""
        return bridge_cost(
            self.codebook_size,
            self.codebook_dim,
            self.group_size,
            hidden_dim=self.hidden_dim,
            depth=len(self.blocks),
            mlp_ratio=self.blocks[0].mlp.fc1.out_features / self.hidden_dim if len(self.blocks) else 2.0,
            params=sum(p.numel() for p in self.parameters()),
        )

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, group_size={self.group_size}, "
            f"tokens={self.num_tokens}, block={self.block!r}"
        )


def bridge_cost(
    codebook_size: int,
    codebook_dim: int,
    group_size: int,
    hidden_dim: int = 256,
    depth: int = 2,
    mlp_ratio: float = 2.0,
    params: int | None = None,
) -> ProjectorCost:
    """Analytic parameters and MACs of a ViT VQBridge (matches the paper's Table 10: 4.30 G at K = 16,384 / g = 16,
    55.89 G at K = 262,144 / g = 64)."""
    t = codebook_size // group_size
    gd = group_size * codebook_dim
    hid = int(hidden_dim * mlp_ratio)
    per_block_params = (hidden_dim * 3 * hidden_dim + 3 * hidden_dim) + (hidden_dim * hidden_dim + hidden_dim)
    per_block_params += (hidden_dim * hid + hid) + (hid * hidden_dim + hidden_dim)
    if params is None:
        params = (gd * hidden_dim + hidden_dim) + depth * per_block_params + (hidden_dim * gd + gd)
    linear_macs = t * gd * hidden_dim * 2  # compress + expand
    block_macs = t * (4 * hidden_dim * hidden_dim + 2 * hidden_dim * hid)  # qkv, proj, mlp
    attn_macs = 2 * t * t * hidden_dim  # q k^T and attn v
    return ProjectorCost(params=params, macs=linear_macs + depth * (block_macs + attn_macs))
