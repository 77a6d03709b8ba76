"""Import LlamaGen class-conditional GPT checkpoints (``c2i_B_256.pt``, ``c2i_L_384.pt``, ...) into fvq's GPT.

LlamaGen (FoundationVision/LlamaGen, ``autoregressive/models/gpt.py``) saves ``{"model": state_dict, ...}`` with keys

* ``cls_embedding.embedding_table.weight`` ``(num_classes + 1, D)`` (the last row is the null class),
* ``tok_embeddings.weight`` ``(V, D)``, ``norm.weight`` ``(D,)``, ``output.weight`` ``(V, D)``,
* per layer ``layers.{i}.attention.wqkv.weight`` ``(3D, D)``, ``layers.{i}.attention.wo.weight``,
  ``layers.{i}.feed_forward.w1/w2/w3.weight``, ``layers.{i}.attention_norm.weight``, ``layers.{i}.ffn_norm.weight``,
* possibly ``freqs_cis`` ``(1 + T, head_dim / 2, 2)`` (the rotary table; current LlamaGen code keeps it out of the
  state dict, but a checkpoint holding it also tells the grid).

The architecture is the same as fvq's; only names differ, plus one convention: LlamaGen's rotary table has
cos = sin = 0 at the class position, so imported models use ``class_position_rope="llamagen"``. LlamaGen's 2D
rotary table rotates the first ``head_dim / 4`` dim pairs by the row and the next ``head_dim / 4`` by the column,
frequencies ``base ** (-4 i / head_dim)``: fvq's :func:`~fvq.generation.gpt.rope_table` computes the same table
(checked against a checkpoint's ``freqs_cis`` when present).

Every key must be accounted for: missing or unexpected keys are refused with their names (never a silent
``strict=False``). The grid is not stored by LlamaGen (unless ``freqs_cis`` is); pass it (``(16, 16)`` for 256 px
VQ-16 models, ``(24, 24)`` for 384 px).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fvq.generation.gpt import GPT, PRESETS, GPTConfig, preset_name, rope_table
from fvq.weights import read_foreign_checkpoint, select_state_dict, strip_wrapper_prefixes

_STATE_DICT_KEYS = ("model", "ema", "module", "state_dict")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "attention.wqkv.weight": "attention.qkv.weight",
    "attention.wo.weight": "attention.proj.weight",
    "feed_forward.w1.weight": "ffn.w1.weight",
    "feed_forward.w2.weight": "ffn.w2.weight",
    "feed_forward.w3.weight": "ffn.w3.weight",
    "attention_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
_TOP_NAMES = {
    "cls_embedding.embedding_table.weight": "class_embedding.weight",
    "tok_embeddings.weight": "token_embedding.weight",
    "norm.weight": "norm.weight",
    "output.weight": "head.weight",
}
_ROPE_KEY = "freqs_cis"


def load_llamagen_gpt_state_dict(path: str | os.PathLike, state_dict_key: str | None = None) -> dict[str, Tensor]:
    """Read the GPT state dict of a LlamaGen checkpoint with ``torch.load(weights_only=True)``.

    Args:
        path: The ``.pt`` file.
        state_dict_key: Entry holding the state dict; default the first of ``"model"``, ``"ema"``, ``"module"``,
            ``"state_dict"`` present, else the file itself when it is a bare state dict (FSDP exports).

    Returns:
        The state dict without ``module.`` / ``_orig_mod.`` prefixes.
    """
    checkpoint = read_foreign_checkpoint(path)
    state, _ = select_state_dict(
        checkpoint,
        path,
        key=state_dict_key,
        entries=_STATE_DICT_KEYS,
        is_bare=lambda c: all(isinstance(v, Tensor) for v in c.values()),
    )
    return state


def _require(state: dict[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise ValueError(f"not a LlamaGen c2i GPT state dict: no {key!r} (keys: {sorted(state)[:12]} ...)")
    return state[key]


def llamagen_gpt_config(
    state: dict[str, Tensor],
    *,
    grid: tuple[int, int] | None = None,
    n_head: int | None = None,
    class_dropout_prob: float = 0.1,
    **overrides: Any,
) -> GPTConfig:
    """The :class:`GPTConfig` of a LlamaGen GPT state dict, read from its tensor shapes.

    Args:
        state: LlamaGen-named state dict.
        grid: Token grid ``(h, w)``; default read from ``freqs_cis`` when present (square grids), else required.
        n_head: Attention heads; default from the preset with this depth and width (head dim 64), else required.
        class_dropout_prob: The training run's class dropout; ``> 0`` (LlamaGen's 0.1) means the last class
            embedding row is the null class.
        overrides: Other :class:`GPTConfig` fields (dropouts, ``activation_checkpointing``).
    """
    vocab_size, dim = _require(state, "tok_embeddings.weight").shape
    class_rows = _require(state, "cls_embedding.embedding_table.weight").shape[0]
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER.match(k))})
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"LlamaGen layers must be numbered 0 .. n - 1, got {layers[:8]} ...")
    n_layer = len(layers)
    if n_head is None:
        match = [shape for shape in PRESETS.values() if shape["n_layer"] == n_layer and shape["dim"] == dim]
        if not match:
            raise ValueError(
                f"no preset has {n_layer} layers of width {dim}; pass n_head (LlamaGen presets use head dim 64)"
            )
        n_head = match[0]["n_head"]
    qkv_rows = _require(state, "layers.0.attention.wqkv.weight").shape[0]
    if qkv_rows != 3 * dim:
        raise ValueError(
            f"layers.0.attention.wqkv.weight has {qkv_rows} rows, expected 3 * {dim}: grouped-query attention "
            f"(n_kv_head < n_head) is not supported"
        )
    if grid is None:
        if _ROPE_KEY not in state:
            raise ValueError(
                "LlamaGen checkpoints do not record the token grid: pass grid=(h, w), e.g. (16, 16) for a 256 px "
                "model on a 16x-downsampling tokenizer, (24, 24) for 384 px"
            )
        positions = state[_ROPE_KEY].shape[0] - 1
        side = math.isqrt(positions) if positions > 0 else 0
        if side * side != positions:
            raise ValueError(f"{_ROPE_KEY} has {positions + 1} rows, not 1 + a square number; pass grid=(h, w)")
        grid = (side, side)
    num_classes = class_rows - 1 if class_dropout_prob > 0 else class_rows
    config = GPTConfig(
        dim=int(dim),
        n_layer=n_layer,
        n_head=int(n_head),
        vocab_size=int(vocab_size),
        grid=tuple(grid),
        num_classes=int(num_classes),
        class_dropout_prob=class_dropout_prob,
        **{"class_position_rope": "llamagen", **overrides},
    )
    hidden = _require(state, "layers.0.feed_forward.w1.weight").shape[0]
    if hidden != config.ffn_hidden_dim:
        raise ValueError(
            f"layers.0.feed_forward.w1.weight has {hidden} rows, expected {config.ffn_hidden_dim} "
            f"(find_multiple(int(8 * {dim} / 3), 256)); checkpoints with ffn_dim_multiplier are not supported"
        )
    return config


def _check_rope_table(table: Tensor, config: GPTConfig) -> None:
    expected = rope_table(config.grid, config.head_dim, config.rope_base, "llamagen")
    if table.shape != expected.shape:
        raise ValueError(
            f"{_ROPE_KEY} has shape {tuple(table.shape)}, expected {tuple(expected.shape)} for a {config.grid} grid, "
            f"head dim {config.head_dim} and one class token"
        )
    if not torch.allclose(table.float(), expected, atol=1e-5, rtol=0):
        error = (table.float() - expected).abs().max().item()
        raise ValueError(
            f"{_ROPE_KEY} differs from fvq's 2D rotary table by up to {error:.3g} (another rotary base or layout?)"
        )


def convert_llamagen_gpt_state_dict(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Rename a LlamaGen GPT state dict to fvq's keys, refusing keys it does not know and checking ``freqs_cis``.

    Returns:
        fvq-named state dict (same tensors), to load into ``GPT(config)``.
    """
    out: dict[str, Tensor] = {}
    unexpected = []
    for key, value in state.items():
        if key == _ROPE_KEY:
            _check_rope_table(value, config)
            continue
        if key in _TOP_NAMES:
            out[_TOP_NAMES[key]] = value
            continue
        match = _LAYER.match(key)
        if match and match.group(2) in _LAYER_NAMES:
            out[f"blocks.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"] = value
            continue
        unexpected.append(key)
    expected_keys = {f"blocks.{i}.{name}" for i in range(config.n_layer) for name in _LAYER_NAMES.values()}
    expected_keys |= set(_TOP_NAMES.values())
    missing = sorted(expected_keys - set(out))
    if unexpected or missing:
        top = {v: k for k, v in _TOP_NAMES.items()}
        layer = {v: k for k, v in _LAYER_NAMES.items()}

        def llamagen_name(key: str) -> str:
            if key in top:
                return top[key]
            _, index, name = key.split(".", 2)  # blocks.{i}.{name}
            return f"layers.{index}.{layer[name]}"

        raise ValueError(
            f"the LlamaGen state dict does not match a c2i GPT with {config.n_layer} layers: {len(unexpected)} "
            f"unexpected keys {sorted(unexpected)[:10]}, {len(missing)} missing keys "
            f"{[llamagen_name(k) for k in missing][:10]}"
        )
    return out


def gpt_from_llamagen_state_dict(
    state: dict[str, Tensor],
    *,
    grid: tuple[int, int] | None = None,
    n_head: int | None = None,
    class_dropout_prob: float = 0.1,
    **overrides: Any,
) -> GPT:
    """Build an fvq :class:`GPT` (eval mode, CPU, the checkpoint's dtype) from a LlamaGen GPT state dict.

    Arguments as :func:`llamagen_gpt_config`.
    """
    state = strip_wrapper_prefixes(state)
    config = llamagen_gpt_config(state, grid=grid, n_head=n_head, class_dropout_prob=class_dropout_prob, **overrides)
    converted = convert_llamagen_gpt_state_dict(state, config)
    with torch.device("meta"):
        model = GPT(config)
    model.check_state_dict(converted, source="the converted LlamaGen state dict")
    model.load_state_dict({k: v.to("cpu") for k, v in converted.items()}, assign=True)
    model.provenance = {"format": "llamagen", "preset": preset_name(config)}
    return model.eval()


def import_llamagen_gpt(
    path: str | os.PathLike,
    *,
    grid: tuple[int, int] | None = None,
    n_head: int | None = None,
    class_dropout_prob: float = 0.1,
    state_dict_key: str | None = None,
    **overrides: Any,
) -> GPT:
    """Read a LlamaGen c2i GPT checkpoint file and return the fvq :class:`GPT` (save it with ``save_pretrained``).

    Args:
        path: The ``.pt`` file (``{"model": state_dict}`` or a bare state dict).
        grid: Token grid ``(h, w)`` (required unless the file holds ``freqs_cis``).
        n_head, class_dropout_prob, overrides: See :func:`llamagen_gpt_config`.
        state_dict_key: Entry holding the state dict (default: found automatically).
    """
    state = load_llamagen_gpt_state_dict(path, state_dict_key)
    model = gpt_from_llamagen_state_dict(
        state, grid=grid, n_head=n_head, class_dropout_prob=class_dropout_prob, **overrides
    )
    model.provenance["file"] = Path(path).name
    return model
