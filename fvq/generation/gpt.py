"""LlamaGen's class-conditional GPT over a raster-ordered grid of tokenizer codes.

Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation", 2024,
https://arxiv.org/abs/2406.06525 (architecture of FoundationVision/LlamaGen, ``autoregressive/models/gpt.py``; the
static KV cache follows pytorch-labs/gpt-fast).

The sequence is ``[class token] + T raster tokens``. Training feeds ``[class] + indices[:, :-1]`` and predicts all
``T`` tokens. Each block is pre-norm: ``x + attention(rmsnorm(x))``, then ``h + swiglu(rmsnorm(h))``; no biases; one
fused q/k/v projection; 2D rotary embeddings over the token grid. The class embedding has one extra row, the learned
null class that classifier-free guidance uses as its unconditional input, whenever class dropout is on.

Differences from LlamaGen, on purpose: the grid may be rectangular; the class position's rotary embedding is the
identity by default (LlamaGen gives it cos = sin = 0, zeroing the class token's query and key; set
``class_position_rope="llamagen"`` to reproduce that, as imported LlamaGen checkpoints do); the KV cache holds exactly
the ``T`` positions ever fed (class + ``T - 1`` tokens) and is not part of the state dict.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fvq.quantizers.base import values_checked

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
MODEL_TYPE = "gpt"
CLASS_POSITION_ROPE = ("identity", "llamagen")
FFN_MULTIPLE_OF = 256

# (n_layer, n_head, dim); head dim 64 in every LlamaGen preset. Parameter counts at vocab 16,384 and 1,000 classes
# (+ the null class): B 110,888,448; L 342,910,976; XL 774,699,520; XXL 1,410,972,672.
PRESETS: dict[str, dict[str, int]] = {
    "gpt_tiny": {"n_layer": 4, "n_head": 4, "dim": 128},
    "gpt_small": {"n_layer": 6, "n_head": 6, "dim": 384},
    "gpt_b": {"n_layer": 12, "n_head": 12, "dim": 768},
    "gpt_l": {"n_layer": 24, "n_head": 16, "dim": 1024},
    "gpt_xl": {"n_layer": 36, "n_head": 20, "dim": 1280},
    "gpt_xxl": {"n_layer": 48, "n_head": 24, "dim": 1536},
}


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is ``>= n``."""
    return n if n % k == 0 else n + k - n % k


# ---------------------------------------------------------------------------------------------------------------------
# configuration
@dataclass
class GPTConfig:
    """Architecture and regularisation of a :class:`GPT`. Every field is plain data (``to_dict`` / ``from_dict``).

    Attributes:
        dim: Model width.
        n_layer: Transformer blocks.
        n_head: Attention heads; ``dim / n_head`` must be a multiple of 4 (2D rotary embedding).
        vocab_size: Distinct token ids (the tokenizer's ``codebook_size``).
        grid: Token grid ``(h, w)``; sequence length ``T = h * w``.
        num_classes: Class labels ``0 .. num_classes - 1``.
        class_dropout_prob: Probability of replacing a label by the null class in training; ``> 0`` adds the null
            class row that classifier-free guidance needs.
        token_dropout_prob: Dropout on the input embeddings (class + tokens).
        resid_dropout_prob: Dropout on the attention output projection.
        ffn_dropout_prob: Dropout on the feed-forward output.
        attn_dropout_prob: Dropout on attention weights.
        norm_eps: RMSNorm epsilon.
        rope_base: Rotary embedding base.
        class_position_rope: ``"identity"`` (class position not rotated) or ``"llamagen"`` (cos = sin = 0 there, as
            LlamaGen; needed for LlamaGen checkpoints).
        activation_checkpointing: Recompute each block in the backward pass (training memory for compute).
        initializer_range: Std of the normal init of every linear and embedding weight.
    """

    dim: int
    n_layer: int
    n_head: int
    vocab_size: int
    grid: tuple[int, int]
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    token_dropout_prob: float = 0.1
    resid_dropout_prob: float = 0.1
    ffn_dropout_prob: float = 0.1
    attn_dropout_prob: float = 0.0
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    class_position_rope: str = "identity"
    activation_checkpointing: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("dim", "n_layer", "n_head", "vocab_size", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        grid = self.grid
        if (
            not isinstance(grid, (tuple, list))
            or len(grid) != 2
            or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)
        ):
            raise ValueError(f"GPTConfig.grid must be two positive ints (height, width), got {grid!r}")
        self.grid = (int(grid[0]), int(grid[1]))
        if self.dim % self.n_head:
            raise ValueError(f"GPTConfig.dim ({self.dim}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 4:
            raise ValueError(
                f"the head dim dim / n_head = {self.head_dim} must be a multiple of 4: the 2D rotary embedding "
                f"turns a quarter of each head's dim pairs by the row and a quarter by the column"
            )
        for name in (
            "class_dropout_prob",
            "token_dropout_prob",
            "resid_dropout_prob",
            "ffn_dropout_prob",
            "attn_dropout_prob",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"GPTConfig.{name} must be a probability in [0, 1), got {value!r}")
            setattr(self, name, float(value))
        for name in ("norm_eps", "rope_base", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"GPTConfig.{name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        if self.norm_eps <= 0 or self.rope_base <= 1 or self.initializer_range < 0:
            raise ValueError(
                f"GPTConfig needs norm_eps > 0, rope_base > 1, initializer_range >= 0; got {self.norm_eps}, "
                f"{self.rope_base}, {self.initializer_range}"
            )
        if self.class_position_rope not in CLASS_POSITION_ROPE:
            raise ValueError(
                f"GPTConfig.class_position_rope must be one of {CLASS_POSITION_ROPE}, got {self.class_position_rope!r}"
            )
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(
                f"GPTConfig.activation_checkpointing must be a bool, got {self.activation_checkpointing!r}"
            )

    @property
    def seq_len(self) -> int:
        """Tokens per image ``T = h * w``."""
        return self.grid[0] * self.grid[1]

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden width: ``int(2 * 4 * dim / 3)`` rounded up to a multiple of 256 (LlamaGen, Llama)."""
        return find_multiple(int(2 * (4 * self.dim) / 3), FFN_MULTIPLE_OF)

    @property
    def has_null_class(self) -> bool:
        """Whether the class embedding has the null-class row (``class_dropout_prob > 0``)."""
        return self.class_dropout_prob > 0

    @property
    def null_class(self) -> int | None:
        """Row of the null class (``num_classes``), or ``None`` without class dropout."""
        return self.num_classes if self.has_null_class else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["grid"] = list(self.grid)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a GPT config must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GPT config keys {unknown}; known keys: {sorted(known)}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"GPT config is missing {missing}")
        data = dict(data)
        if isinstance(data.get("grid"), list):
            data["grid"] = tuple(data["grid"])
        return cls(**data)


def available_presets() -> list[str]:
    return list(PRESETS)


def _preset_key(name: str) -> str:
    key = name.lower().replace("-", "_")
    if key not in PRESETS:
        raise ValueError(f"unknown GPT preset {name!r}; available: {available_presets()}")
    return key


def gpt_config(
    preset: str, *, vocab_size: int, grid: tuple[int, int], num_classes: int = 1000, **overrides: Any
) -> GPTConfig:
    """A :class:`GPTConfig` from a preset (``"gpt_b"``, ``"GPT-B"``, ...) and the tokenizer's layout.

    Args:
        preset: One of :data:`PRESETS` (case and ``-``/``_`` ignored).
        vocab_size: The tokenizer's codebook size (see :class:`~fvq.generation.layout.TokenLayout`).
        grid: The tokenizer's token grid ``(h, w)`` for the image size.
        num_classes: Class labels.
        overrides: Any other :class:`GPTConfig` field (dropouts, ``class_position_rope``, ...).
    """
    shape = PRESETS[_preset_key(preset)]
    clash = sorted(set(shape) & set(overrides))
    if clash:
        raise ValueError(f"{clash} are set by preset {preset!r}; build a GPTConfig directly for another shape")
    return GPTConfig(**shape, vocab_size=vocab_size, grid=grid, num_classes=num_classes, **overrides)


def build_gpt(
    preset: str,
    *,
    vocab_size: int,
    grid: tuple[int, int],
    num_classes: int = 1000,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> GPT:
    """Build a freshly initialised :class:`GPT` from a preset (see :func:`gpt_config`) on ``device``."""
    config = gpt_config(preset, vocab_size=vocab_size, grid=grid, num_classes=num_classes, **overrides)
    with torch.device(device if device is not None else "cpu"):
        return GPT(config)


def preset_name(config: GPTConfig) -> str | None:
    """The preset whose shape (layers, heads, width) ``config`` has, or ``None``."""
    for name, shape in PRESETS.items():
        if all(getattr(config, key) == value for key, value in shape.items()):
            return name
    return None


# ---------------------------------------------------------------------------------------------------------------------
# 2D rotary embedding
def rope_frequencies(head_dim: int, base: float = 10000.0) -> Tensor:
    """The ``head_dim / 4`` rotation frequencies ``base ** (-4 i / head_dim)``, fp32 (LlamaGen's formula)."""
    half = head_dim // 2
    return 1.0 / (base ** (torch.arange(0, half, 2, device="cpu")[: half // 2].float() / half))


def rope_table(grid: tuple[int, int], head_dim: int, base: float = 10000.0, class_position: str = "identity") -> Tensor:
    """Cosines and sines of the 2D rotary embedding for the class position and every grid position.

    Pair ``j`` of a head's dims ``(x[2j], x[2j+1])`` is rotated as a complex number. Pairs ``0 .. head_dim/4 - 1`` turn
    by ``row * f_j``, pairs ``head_dim/4 .. head_dim/2 - 1`` by ``col * f_(j - head_dim/4)``, with token ``t`` at
    ``(row, col) = (t // w, t % w)`` (LlamaGen's ``precompute_freqs_cis_2d``, for any ``h x w``).

    Returns:
        ``(1 + h * w, head_dim / 2, 2)`` fp32 on the CPU: ``[..., 0]`` cos, ``[..., 1]`` sin; row 0 is the class
        position (cos 1, sin 0 for ``"identity"``; cos = sin = 0 for ``"llamagen"``), row ``1 + t`` grid token ``t``.
    """
    if class_position not in CLASS_POSITION_ROPE:
        raise ValueError(f"class_position must be one of {CLASS_POSITION_ROPE}, got {class_position!r}")
    h, w = grid
    freqs = rope_frequencies(head_dim, base)  # (head_dim / 4,)
    rows = torch.arange(h, device="cpu").repeat_interleave(w)  # (T,) t // w
    cols = torch.arange(w, device="cpu").repeat(h)  # (T,) t % w
    angles = torch.cat([torch.outer(rows, freqs), torch.outer(cols, freqs)], dim=-1)  # (T, head_dim / 2)
    table = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (T, head_dim / 2, 2)
    first = torch.zeros(1, head_dim // 2, 2, device="cpu")  # (1, head_dim / 2, 2)
    if class_position == "identity":
        first[..., 0] = 1.0
    return torch.cat([first, table])  # (1 + T, head_dim / 2, 2)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate adjacent dim pairs of ``x`` ``(B, S, H, head_dim)`` by ``table`` ``(S, head_dim / 2, 2)``, in fp32."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, S, H, head_dim / 2, 2)
    cos = table[None, :, None, :, 0]  # (1, S, 1, head_dim / 2)
    sin = table[None, :, None, :, 1]  # (1, S, 1, head_dim / 2)
    real, imag = pairs[..., 0], pairs[..., 1]  # (B, S, H, head_dim / 2)
    rotated = torch.stack([real * cos - imag * sin, imag * cos + real * sin], dim=-1)  # (B, S, H, head_dim / 2, 2)
    return rotated.flatten(3).type_as(x)  # (B, S, H, head_dim)


# ---------------------------------------------------------------------------------------------------------------------
# layers
class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, then cast back and scaled (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()  # (..., D)
        normed = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)  # (..., D)
        return normed.type_as(x) * self.weight  # (..., D)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)`` then dropout (Shazeer 2020)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        hidden = F.silu(self.w1(x)) * self.w3(x)  # (B, S, hidden)
        return self.dropout(self.w2(hidden))  # (B, S, D)


class KVCache(nn.Module):
    """Static keys and values of every position fed so far, ``(max_batch, H, max_len, head_dim)`` each.

    Buffers are not persistent: the cache never enters a state dict. A batch smaller than ``max_batch`` uses the
    first rows.
    """

    def __init__(
        self, max_batch: int, n_head: int, max_len: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        shape = (max_batch, n_head, max_len, head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_batch(self) -> int:
        return int(self.keys.shape[0])

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k``, ``v`` ``(B, H, S, head_dim)`` at positions ``input_pos`` ``(S,)``; return the whole cache rows
        ``(B, H, max_len, head_dim)`` in the dtype of ``k``."""
        batch = k.shape[0]
        keys, values = self.keys[:batch], self.values[:batch]  # (B, H, max_len, head_dim) views
        keys.index_copy_(2, input_pos, k.to(keys.dtype))
        values.index_copy_(2, input_pos, v.to(values.dtype))
        return keys.to(k.dtype), values.to(v.dtype)

    def reset(self) -> None:
        self.keys.zero_()
        self.values.zero_()


class Attention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection and the 2D rotary embedding."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)
        self.attn_dropout_prob = config.attn_dropout_prob
        self.resid_dropout = nn.Dropout(config.resid_dropout_prob)
        self.register_module("kv_cache", None)

    def forward(self, x: Tensor, rope: Tensor, input_pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Without ``input_pos``: causal attention within ``x``. With it: write to the KV cache at ``input_pos``
        ``(S,)`` and attend to the cache through ``mask`` ``(S, max_len)`` (True = attend)."""
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.n_head, self.head_dim)  # (B, S, 3, H, head_dim)
        q, k, v = qkv.unbind(dim=2)  # each (B, S, H, head_dim)
        q = apply_rope(q, rope).transpose(1, 2)  # (B, H, S, head_dim)
        k = apply_rope(k, rope).transpose(1, 2)  # (B, H, S, head_dim)
        v = v.transpose(1, 2)  # (B, H, S, head_dim)
        dropout = self.attn_dropout_prob if self.training else 0.0
        if input_pos is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)  # (B, H, S, head_dim)
        else:
            keys, values = self.kv_cache.update(input_pos, k, v)  # (B, H, max_len, head_dim) each
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout)  # (B, H, S, hd)
        out = out.transpose(1, 2).reshape(batch, length, dim)  # (B, S, D)
        return self.resid_dropout(self.proj(out))  # (B, S, D)


class Block(nn.Module):
    """Pre-norm transformer block: ``h = x + attention(norm(x))``, ``out = h + ffn(norm(h))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn = FeedForward(config.dim, config.ffn_hidden_dim, config.ffn_dropout_prob)

    def forward(self, x: Tensor, rope: Tensor, input_pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, input_pos, mask)  # (B, S, D)
        return h + self.ffn(self.ffn_norm(h))  # (B, S, D)


# ---------------------------------------------------------------------------------------------------------------------
# the model
def _check_integer(x: Any, name: str, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer {what}, got dtype {x.dtype}")


@dataclass
class GPTOutput:
    """Result of :meth:`GPT.forward`.

    Attributes:
        logits: ``(B, T, V)`` fp32; ``logits[:, t]`` predicts token ``t`` from the class and tokens ``< t``.
        loss: Mean cross-entropy of all ``B * T`` tokens, scalar.
    """

    logits: Tensor
    loss: Tensor


class GPT(nn.Module):
    """Class-conditional autoregressive transformer over ``T = h * w`` raster-ordered tokens (LlamaGen's ``c2i``).

    Args:
        config: The architecture; build one with :func:`gpt_config` / :func:`build_gpt` from a preset and the
            tokenizer's layout.

    Submodules (state-dict keys): ``class_embedding`` (``num_classes (+1)``, D), ``token_embedding`` (V, D),
    ``blocks.{i}.{attention_norm, attention.qkv, attention.proj, ffn_norm, ffn.w1, ffn.w2, ffn.w3}``, ``norm``,
    ``head`` (D -> V).

    Inference with the KV cache: :meth:`setup_cache` (or :meth:`ensure_cache`), then :meth:`prefill` with the class
    (position 0), then :meth:`decode_step` for each token (positions ``1 .. T - 1``); see
    :func:`fvq.generation.sampling.generate`.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        num_class_rows = config.num_classes + int(config.has_null_class)
        self.class_embedding = nn.Embedding(num_class_rows, config.dim)
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.token_dropout = nn.Dropout(config.token_dropout_prob)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.provenance: dict[str, Any] = {}
        # fp32 rotary tables per device; a plain attribute so that casting the model (bf16) never rounds them
        self._rope_tables: dict[torch.device, Tensor] = {}
        self._cache_positions: Tensor | None = None
        if self.head.weight.device.type != "meta":  # meta: shapes only (parameter counts, loading with assign=True)
            self.reset_parameters()

    # -----------------------------------------------------------------------------------------------------------------
    # construction, properties
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, initializer_range) for every linear and embedding weight, ones for norms, a zero output head (so the
        initial loss is exactly ln V)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        nn.init.zeros_(self.head.weight)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    @property
    def seq_len(self) -> int:
        return self.config.seq_len

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _rope(self, device: torch.device) -> Tensor:
        table = self._rope_tables.get(device)
        if table is None:
            c = self.config
            with torch.inference_mode(False):  # a normal tensor even when first built under inference mode
                table = rope_table(c.grid, c.head_dim, c.rope_base, c.class_position_rope).to(device)
            self._rope_tables[device] = table
        return table  # (1 + T, head_dim / 2, 2) fp32

    # -----------------------------------------------------------------------------------------------------------------
    # input checks (one device sync for all range checks)
    def _check_tokens(self, tokens: Tensor, name: str, batch: int | None, length: int | tuple[int, int]) -> None:
        _check_integer(tokens, name, "token ids")
        ok_length = tokens.ndim == 2 and (
            tokens.shape[1] == length if isinstance(length, int) else length[0] <= tokens.shape[1] <= length[1]
        )
        if not ok_length or (batch is not None and tokens.shape[0] != batch):
            want = f"{length}" if isinstance(length, int) else f"{length[0]}..{length[1]}"
            raise ValueError(
                f"{name} must have shape ({'B' if batch is None else batch}, {want}) (the {self.config.grid[0]}x"
                f"{self.config.grid[1]} grid in raster order), got {tuple(tokens.shape)}"
            )

    def _check_classes(self, classes: Tensor, batch: int | None = None) -> None:
        _check_integer(classes, "classes", "class ids")
        if classes.ndim != 1 or (batch is not None and classes.shape[0] != batch):
            want = "B" if batch is None else batch
            raise ValueError(f"classes must have shape ({want},), got {tuple(classes.shape)}")

    def _check_ranges(self, classes: Tensor, tokens: Tensor | None) -> None:
        if not values_checked():  # a training step (fvq.quantizers.base.trusted_values): the data checked its ids
            return
        bad_classes = (classes < 0) | (classes >= self.config.num_classes)
        bad = bad_classes.any()
        if tokens is not None and tokens.numel():
            bad_tokens = (tokens < 0) | (tokens >= self.config.vocab_size)
            bad = bad | bad_tokens.any()
        if not bool(bad):
            return
        if bool(bad_classes.any()):
            values = sorted({int(v) for v in classes[bad_classes][:8].tolist()})
            hint = " (select the null class with drop_classes, not by its id)" if self.config.has_null_class else ""
            raise ValueError(f"class ids must be in [0, {self.config.num_classes}), got {values}{hint}")
        values = sorted({int(v) for v in tokens[bad_tokens][:8].tolist()})
        raise ValueError(
            f"token ids must be in [0, {self.config.vocab_size}) (the tokenizer's codebook size), got {values}; "
            f"were the tokens made by another tokenizer?"
        )

    def _check_drop(self, drop_classes: Tensor | None, batch: int) -> None:
        if drop_classes is None:
            return
        if not isinstance(drop_classes, Tensor) or drop_classes.dtype != torch.bool or drop_classes.shape != (batch,):
            got = tuple(drop_classes.shape) if isinstance(drop_classes, Tensor) else type(drop_classes).__name__
            raise ValueError(f"drop_classes must be a bool tensor of shape ({batch},), got {got}")
        if not self.config.has_null_class:
            raise ValueError(
                "drop_classes needs the null class, which this model lacks (trained with class_dropout_prob = 0)"
            )

    # -----------------------------------------------------------------------------------------------------------------
    # forward passes
    def _class_ids(self, classes: Tensor, drop_classes: Tensor | None) -> Tensor:
        classes = classes.long()  # (B,)
        if drop_classes is None:
            return classes
        return torch.where(drop_classes, torch.full_like(classes, self.config.num_classes), classes)  # (B,)

    def _embed(self, classes: Tensor, drop_classes: Tensor | None, tokens: Tensor | None) -> Tensor:
        h = self.class_embedding(self._class_ids(classes, drop_classes))[:, None]  # (B, 1, D)
        if tokens is not None and tokens.shape[1] > 0:
            h = torch.cat([h, self.token_embedding(tokens.long())], dim=1)  # (B, 1 + S, D)
        return self.token_dropout(h)  # (B, 1 + S, D)

    def _trunk(self, h: Tensor, rope: Tensor, input_pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                h = checkpoint(block, h, rope, use_reentrant=False)  # (B, S, D)
            else:
                h = block(h, rope, input_pos, mask)  # (B, S, D)
        h = self.norm(h)  # (B, S, D)
        return self.head(h).float()  # (B, S, V)

    def _train_drop(self, classes: Tensor, drop_classes: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """Class dropout (training only): each label becomes the null class with probability class_dropout_prob."""
        if not (self.training and self.config.has_null_class):
            return drop_classes
        device = generator.device if generator is not None else classes.device
        draw = torch.rand(classes.shape[0], generator=generator, device=device).to(classes.device)  # (B,)
        dropped = draw < self.config.class_dropout_prob  # (B,)
        return dropped if drop_classes is None else dropped | drop_classes

    def forward(
        self,
        indices: Tensor,
        classes: Tensor,
        *,
        drop_classes: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> GPTOutput:
        """Teacher-forced logits and loss of full sequences.

        Args:
            indices: ``(B, T)`` integer token ids in raster order, ``T = h * w``.
            classes: ``(B,)`` class ids in ``[0, num_classes)``.
            drop_classes: Optional ``(B,)`` bool: use the null class for these samples.
            generator: Random source of class dropout (training mode only); default the global RNG.

        Returns:
            :class:`GPTOutput` with ``logits`` ``(B, T, V)`` and the mean cross-entropy ``loss``.
        """
        self._check_tokens(indices, "indices", None, self.config.seq_len)
        self._check_classes(classes, indices.shape[0])
        self._check_drop(drop_classes, indices.shape[0])
        self._check_ranges(classes, indices)
        drop = self._train_drop(classes, drop_classes, generator)  # (B,) bool or None
        h = self._embed(classes, drop, indices[:, :-1])  # (B, T, D): [class] + tokens 0 .. T-2
        logits = self._trunk(h, self._rope(h.device)[: h.shape[1]])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), indices.reshape(-1).long())  # scalar
        return GPTOutput(logits=logits, loss=loss)

    def prefix_logits(self, classes: Tensor, prefix: Tensor, *, drop_classes: Tensor | None = None) -> Tensor:
        """Logits after the class and after each token of ``prefix``, recomputed in full (no cache).

        Args:
            classes: ``(B,)`` class ids.
            prefix: ``(B, S)`` token ids, ``0 <= S < T``.
            drop_classes: Optional ``(B,)`` bool: use the null class for these samples.

        Returns:
            ``(B, S + 1, V)`` fp32: entry ``s`` predicts token ``s``.
        """
        self._check_classes(classes)
        self._check_tokens(prefix, "prefix", classes.shape[0], (0, self.config.seq_len - 1))
        self._check_drop(drop_classes, classes.shape[0])
        self._check_ranges(classes, prefix)
        return self._prefix_logits(classes, drop_classes, prefix)

    def _prefix_logits(self, classes: Tensor, drop_classes: Tensor | None, prefix: Tensor) -> Tensor:
        h = self._embed(classes, drop_classes, prefix)  # (B, S + 1, D)
        return self._trunk(h, self._rope(h.device)[: h.shape[1]])  # (B, S + 1, V)

    # -----------------------------------------------------------------------------------------------------------------
    # KV cache
    def setup_cache(
        self, max_batch: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        """Allocate a static KV cache of ``T`` positions for up to ``max_batch`` sequences (a CFG batch counts twice).

        Args:
            max_batch: Largest batch :meth:`prefill` / :meth:`decode_step` will see.
            dtype: Cache dtype; default the model's parameter dtype.
            device: Cache device; default the model's device.
        """
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        dtype = dtype if dtype is not None else self.dtype
        device = torch.device(device) if device is not None else self.device
        c = self.config
        # normal tensors even under inference mode, so that a cache made there serves later calls outside it
        with torch.inference_mode(False):
            for block in self.blocks:
                block.attention.kv_cache = KVCache(max_batch, c.n_head, c.seq_len, c.head_dim, dtype, device)
            self._cache_positions = torch.arange(c.seq_len, device=device)

    def ensure_cache(
        self, max_batch: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> None:
        """:meth:`setup_cache` unless the current cache already holds ``max_batch`` rows of that dtype and device."""
        dtype = dtype if dtype is not None else self.dtype
        device = torch.device(device) if device is not None else self.device
        cache = self.blocks[0].attention.kv_cache
        if cache is None or cache.max_batch < max_batch or cache.keys.dtype != dtype or cache.keys.device != device:
            self.setup_cache(max_batch, dtype, device)

    @property
    def cache_batch_size(self) -> int:
        """Rows of the current KV cache (0 without one)."""
        cache = self.blocks[0].attention.kv_cache
        return 0 if cache is None else cache.max_batch

    def reset_cache(self) -> None:
        """Zero the KV cache (not needed between generations: positions are always rewritten before being read)."""
        for block in self.blocks:
            if block.attention.kv_cache is not None:
                block.attention.kv_cache.reset()

    def clear_cache(self) -> None:
        """Free the KV cache."""
        for block in self.blocks:
            block.attention.kv_cache = None
        self._cache_positions = None

    def _check_cache(self, batch: int) -> None:
        if self.training:
            raise RuntimeError("the KV cache is for inference; call model.eval() first (dropout would be on)")
        if self.cache_batch_size < batch:
            raise RuntimeError(
                f"no KV cache for a batch of {batch}: call setup_cache(max_batch >= {batch}) first "
                f"(current cache: {self.cache_batch_size} rows)"
            )

    def _cached(self, h: Tensor, input_pos: Tensor) -> Tensor:
        mask = self._cache_positions[None, :] <= input_pos[:, None]  # (S, T): position p sees keys 0 .. p
        rope = self._rope(h.device)[input_pos]  # (S, head_dim / 2, 2)
        return self._trunk(h, rope, input_pos, mask)  # (B, S, V)

    def prefill(self, classes: Tensor, prefix: Tensor | None = None, *, drop_classes: Tensor | None = None) -> Tensor:
        """Feed the class token (and an optional prefix of tokens) into the KV cache from position 0.

        Args:
            classes: ``(B,)`` class ids in ``[0, num_classes)``.
            prefix: Optional ``(B, S)`` tokens ``0 .. S - 1``, ``S < T``.
            drop_classes: Optional ``(B,)`` bool: use the null class (the CFG unconditional) for these samples.

        Returns:
            ``(B, V)`` fp32 logits of token ``S`` (token 0 without a prefix).
        """
        self._check_classes(classes)
        self._check_drop(drop_classes, classes.shape[0])
        if prefix is not None:
            self._check_tokens(prefix, "prefix", classes.shape[0], (0, self.config.seq_len - 1))
        self._check_ranges(classes, prefix)
        self._check_cache(classes.shape[0])
        return self._prefill(classes, drop_classes, prefix)

    def _prefill(self, classes: Tensor, drop_classes: Tensor | None, prefix: Tensor | None = None) -> Tensor:
        h = self._embed(classes, drop_classes, prefix)  # (B, 1 + S, D)
        input_pos = torch.arange(h.shape[1], device=h.device)  # (1 + S,)
        return self._cached(h, input_pos)[:, -1]  # (B, V)

    def decode_step(self, tokens: Tensor, input_pos: int | Tensor) -> Tensor:
        """Feed one token per sequence at sequence position ``input_pos`` (the class is position 0, grid token ``t``
        is position ``t + 1``).

        Args:
            tokens: ``(B,)`` ids of grid token ``input_pos - 1``.
            input_pos: Position ``1 <= input_pos < T``, an int or a ``(1,)`` int64 tensor (its value is not checked).

        Returns:
            ``(B, V)`` fp32 logits of grid token ``input_pos``.
        """
        _check_integer(tokens, "tokens", "token ids")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must have shape (B,) (one token per sequence), got {tuple(tokens.shape)}")
        if isinstance(input_pos, Tensor):
            if input_pos.shape != (1,):
                raise ValueError(f"input_pos must be an int or a (1,) tensor, got shape {tuple(input_pos.shape)}")
        elif isinstance(input_pos, bool) or not isinstance(input_pos, int) or not 1 <= input_pos < self.seq_len:
            raise ValueError(f"input_pos must be in [1, {self.seq_len}) (0 is the class, see prefill), got {input_pos}")
        bad = ((tokens < 0) | (tokens >= self.config.vocab_size)).any()
        if bool(bad):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got {tokens.tolist()[:8]}")
        self._check_cache(tokens.shape[0])
        return self._decode(tokens, input_pos)

    def _decode(self, tokens: Tensor, input_pos: int | Tensor) -> Tensor:
        if not isinstance(input_pos, Tensor):
            input_pos = torch.tensor([input_pos], device=tokens.device)
        h = self.token_dropout(self.token_embedding(tokens.long()[:, None]))  # (B, 1, D)
        return self._cached(h, input_pos.to(tokens.device))[:, -1]  # (B, V)

    # -----------------------------------------------------------------------------------------------------------------
    # save / load
    def check_state_dict(self, state: dict[str, Tensor], source: str = "the state dict") -> None:
        """Raise ``ValueError`` naming missing keys, unexpected keys and shape mismatches unless ``state`` fits."""
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        given = {k: tuple(v.shape) for k, v in state.items()}
        missing = sorted(set(expected) - set(given))
        unexpected = sorted(set(given) - set(expected))
        common = sorted(set(given) & set(expected))
        shapes = [f"{k}: {given[k]} vs {expected[k]}" for k in common if given[k] != expected[k]]
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys {missing[:8]}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys {unexpected[:8]}")
            if shapes:
                parts.append(f"{len(shapes)} shape mismatches (given vs model) {shapes[:8]}")
            raise ValueError(
                f"{source} is a checkpoint of another architecture than this GPT ({self.config.n_layer} layers, "
                f"dim {self.config.dim}, vocab {self.config.vocab_size}, {self.config.num_classes} classes, "
                f"grid {self.config.grid}): " + "; ".join(parts)
            )

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` (each atomically; created if missing).

        Call on one process only (rank 0) and on the bare module (unwrapped from DDP / ``torch.compile``). The KV
        cache is never saved.
        """
        from safetensors.torch import save as safetensors_save

        from fvq.version import __version__
        from fvq.weights import atomic_write_bytes

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        weights = safetensors_save(state, metadata={"format": "pt", "fvq_version": __version__})
        config: dict[str, Any] = {
            "type": MODEL_TYPE,
            "gpt": self.config.to_dict(),
            "preset": preset_name(self.config),
            "fvq_version": __version__,
            "format_version": FORMAT_VERSION,
        }
        if self.provenance:
            config["imported_from"] = self.provenance
        atomic_write_bytes(directory / WEIGHTS_NAME, weights)
        atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, map_location: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> GPT:
        """Rebuild a GPT saved by :meth:`save_pretrained` (no pickle). Returned in eval mode.

        Args:
            directory: Folder holding ``config.json`` and ``model.safetensors``.
            map_location: Device for the weights.
            dtype: Cast the weights to this dtype (default: as saved).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: a saved generator folder holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                    f"(written by GPT.save_pretrained or the LlamaGen importer)"
                )
        data = json.loads(config_path.read_text())
        if data.get("type") != MODEL_TYPE or "gpt" not in data:
            raise ValueError(
                f"{config_path} does not describe a generator (type {data.get('type')!r}, expected {MODEL_TYPE!r}); "
                f"is it a tokenizer folder?"
            )
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{config_path} has format_version {version!r}; this fvq reads format_version <= {FORMAT_VERSION} "
                f"(upgrade fvq)"
            )
        config = GPTConfig.from_dict(data["gpt"])
        with torch.device("meta"):
            model = cls(config)
        state = load_file(str(weights_path), device=str(map_location))
        model.check_state_dict(state, source=str(weights_path))
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        model.provenance = dict(data.get("imported_from") or {})
        return model.eval()

    def extra_repr(self) -> str:
        c = self.config
        return f"vocab_size={c.vocab_size}, grid={c.grid}, num_classes={c.num_classes}"
