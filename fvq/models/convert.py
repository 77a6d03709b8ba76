"""Import LlamaGen / FVQ-release VQGAN checkpoints into fvq's format (``config.json`` + ``model.safetensors``).

Supported input: a torch ``.pt`` file holding a state dict with the keys of LlamaGen's
``tokenizer/tokenizer_image/vq_model.py`` (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``,
``quantize.embedding.weight``, optionally the ``quantize.codebook_used`` usage queue), either bare or under
``"ema"``, ``"model"`` or ``"state_dict"`` (LlamaGen's training checkpoints also hold the optimizer, the
discriminator and an ``argparse.Namespace`` of arguments; the file is read with ``torch.load(weights_only=True)``,
with ``argparse.Namespace`` as the only class allowed besides tensors and containers).

* LlamaGen's own tokenizers l2-normalise codes and latents (``codebook_l2_norm=True``, codebook dim 8): imported with
  ``distance="cosine"``.
* FVQ's released tokenizers are in this same "VQGAN format": ``quantize.embedding.weight`` already holds the mapped
  codebook ``f(C)`` (the authors' ``convert_fullvq2vq.py`` drops the bridge), searched with plain squared L2
  (codebook dim 256, no l2-normalisation): imported with ``distance="l2"``. Reading them with LlamaGen's
  normalising defaults silently gives wrong codes; this importer does not.
* FVQ *training* checkpoints (raw codebook plus ``quantize.qbridge.*`` bridge weights) are not imported: their bridge
  groups codes as 2D patches of a sqrt(K) x sqrt(K) grid (a different code order from fvq's 1D grouping) and comes in
  two block types. Convert them to VQGAN format with the authors' converter first; the error says so.

The architecture (widths, levels, residual blocks, attention levels) is read from the tensor shapes, so VQ-16, VQ-8
and other LlamaGen-layout sizes all import; the matching preset name is recorded when there is one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from fvq.models.presets import preset_name, resolve_model_config
from fvq.models.tokenizer import Tokenizer
from fvq.weights import read_foreign_checkpoint, select_state_dict

SOURCES = ("auto", "llamagen", "fvq")
_STATE_DICT_KEYS = ("ema", "model", "state_dict")
_QUANTIZER_KEYS = {"quantize.embedding.weight", "quantize.codebook_used"}
_TOP_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")


def load_llamagen_state_dict(
    path: str | os.PathLike, state_dict_key: str | None = None
) -> tuple[dict[str, Tensor], str | None, Any]:
    """Read the generator state dict of a LlamaGen-layout checkpoint.

    Args:
        path: The ``.pt`` file.
        state_dict_key: Entry holding the state dict; default: the first of ``"ema"``, ``"model"``, ``"state_dict"``
            present, else the file itself when it is a bare state dict.

    Returns:
        ``(state_dict, key_used, args)``: keys without ``module.`` / ``_orig_mod.`` prefixes, the entry read
        (``None`` for a bare state dict) and the checkpoint's ``"args"`` entry (or ``None``).
    """
    path = Path(path)
    checkpoint = read_foreign_checkpoint(path)
    args = checkpoint.get("args")
    state, key = select_state_dict(
        checkpoint,
        path,
        key=state_dict_key,
        entries=_STATE_DICT_KEYS,
        is_bare=lambda c: any(isinstance(k, str) and k.startswith(("encoder.", "module.encoder.")) for k in c),
    )
    return state, key, args


def _shape(state: dict[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ValueError(f"the checkpoint lacks {key!r}, which every LlamaGen VQ model has")
    return tuple(state[key].shape)


def _levels(state: dict[str, Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.conv_blocks\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := pattern.match(k))})


def _count(state: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def llamagen_model_config(state: dict[str, Tensor], *, norm_groups: int = 32) -> dict[str, Any]:
    """Read fvq's model config (see :mod:`fvq.models.presets`) from the shapes of a LlamaGen-layout state dict.

    Args:
        state: Generator state dict with LlamaGen's keys.
        norm_groups: GroupNorm groups (not stored in the weights; LlamaGen always uses 32).

    Returns:
        A fully resolved model config.
    """
    ch, in_channels = _shape(state, "encoder.conv_in.weight")[:2]
    levels = _levels(state, "encoder")
    if levels != list(range(len(levels))) or not levels:
        raise ValueError(f"encoder levels must be numbered 0..L-1, found {levels}")
    num_levels = len(levels)
    ch_mult = []
    for level in levels:
        width = _shape(state, f"encoder.conv_blocks.{level}.res.0.conv1.weight")[0]
        if width % ch:
            raise ValueError(f"encoder level {level} has width {width}, not a multiple of the base width {ch}")
        ch_mult.append(width // ch)
    num_res_blocks = _count(state, "encoder.conv_blocks.0.res")
    attn_levels = [lv for lv in levels if _count(state, f"encoder.conv_blocks.{lv}.attn") > 0]

    if _levels(state, "decoder") != levels:
        raise ValueError(f"decoder has levels {_levels(state, 'decoder')}, encoder {levels}; fvq needs them equal")
    dec_ch_mult = [0] * num_levels
    dec_attn = []
    for i in levels:  # decoder block i is level L - 1 - i
        level = num_levels - 1 - i
        dec_ch_mult[level] = _shape(state, f"decoder.conv_blocks.{i}.res.0.conv1.weight")[0] // ch
        if _count(state, f"decoder.conv_blocks.{i}.attn") > 0:
            dec_attn.append(level)
    if dec_ch_mult != ch_mult:
        raise ValueError(f"decoder ch_mult {dec_ch_mult} differs from encoder ch_mult {ch_mult}; fvq needs them equal")
    if sorted(dec_attn) != attn_levels:
        raise ValueError(f"decoder attention levels {sorted(dec_attn)} differ from the encoder's {attn_levels}")
    mid_attention = "encoder.mid.1.q.weight" in state
    if ("decoder.mid.1.q.weight" in state) != mid_attention:
        raise ValueError("encoder and decoder disagree on attention in the middle block")
    config = {
        "in_channels": in_channels,
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks,
        "decoder_num_res_blocks": _count(state, "decoder.conv_blocks.0.res"),
        "z_channels": _shape(state, "encoder.conv_out.weight")[0],
        "attn_levels": attn_levels,
        "mid_attention": mid_attention,
        "norm_groups": norm_groups,
        "dropout": 0.0,
    }
    out_channels = _shape(state, "decoder.conv_out.weight")[0]
    if out_channels != in_channels:
        raise ValueError(f"decoder outputs {out_channels} channels but the encoder reads {in_channels}")
    return resolve_model_config(config)


def llamagen_to_fvq_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a LlamaGen-layout state dict to :class:`~fvq.models.tokenizer.Tokenizer` keys.

    ``quantize.embedding.weight`` becomes ``quantizer.codebook``; the usage queue ``quantize.codebook_used`` is
    dropped; every other key keeps its name.
    """
    bridge = sorted(k for k in state if k.startswith("quantize.") and k not in _QUANTIZER_KEYS)
    if bridge:
        raise ValueError(
            f"the checkpoint holds codebook-projector weights ({bridge[:4]}{' ...' if len(bridge) > 4 else ''}): "
            f"an FVQ training checkpoint with a raw codebook and a bridge. fvq imports the VQGAN format whose "
            f"quantize.embedding.weight is the mapped codebook f(C); convert it first with the FVQ authors' "
            f"tokenizer/tokenizer_image/convert_fullvq2vq.py, or use the released VQGAN-format checkpoint"
        )
    stray = sorted(k for k in state if not k.startswith(_TOP_PREFIXES))
    if stray:
        raise ValueError(f"unexpected keys in the generator state dict (not a LlamaGen VQ model?): {stray[:8]}")
    out = {}
    for key, value in state.items():
        if key == "quantize.codebook_used":
            continue
        out["quantizer.codebook" if key == "quantize.embedding.weight" else key] = value
    return out


def _resolve_distance(source: str, codebook_dim: int, args: Any) -> tuple[str, str]:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "llamagen":
        return "cosine", "source='llamagen'"
    if source == "fvq":
        return "l2", "source='fvq'"
    l2_norm = getattr(args, "codebook_l2_norm", None)
    if isinstance(l2_norm, bool):
        return ("cosine" if l2_norm else "l2"), f"checkpoint args codebook_l2_norm={l2_norm}"
    # Released LlamaGen tokenizers use dim 8 with l2-normalisation; FVQ's use dim 256 without.
    distance = "cosine" if codebook_dim <= 32 else "l2"
    return distance, f"codebook_dim={codebook_dim} ({'<=' if distance == 'cosine' else '>'} 32)"


def import_llamagen_checkpoint(
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None,
    *,
    source: str = "auto",
    state_dict_key: str | None = None,
    norm_groups: int = 32,
    commitment_weight: float = 0.25,
) -> Tokenizer:
    """Convert a LlamaGen / FVQ-release VQGAN checkpoint into an fvq :class:`~fvq.models.tokenizer.Tokenizer`.

    Args:
        path: The ``.pt`` checkpoint.
        out_dir: Folder for ``config.json`` + ``model.safetensors``; ``None`` converts without writing.
        source: ``"llamagen"`` (l2-normalised codes, ``distance="cosine"``), ``"fvq"`` (plain squared L2,
            ``distance="l2"``) or ``"auto"``: the checkpoint's ``args.codebook_l2_norm`` when present, else cosine
            for codebook dims <= 32 (LlamaGen's releases use 8) and L2 above (FVQ's use 256).
        state_dict_key: Entry of the checkpoint holding the weights (default: ``ema``, ``model``, ``state_dict``,
            in that order, or the bare state dict).
        norm_groups: GroupNorm groups of the model (LlamaGen: 32).
        commitment_weight: Commitment weight recorded in the quantizer config (LlamaGen/FVQ: 0.25).

    Returns:
        The converted tokenizer, in eval mode; its ``config["imported_from"]`` records the source and choices.
    """
    path = Path(path)
    state, key, args = load_llamagen_state_dict(path, state_dict_key)
    model_config = llamagen_model_config(state, norm_groups=norm_groups)
    codebook_size, codebook_dim = _shape(state, "quantize.embedding.weight")
    distance, reason = _resolve_distance(source, codebook_dim, args)
    name = preset_name(model_config)
    config = {
        "model": model_config,
        "quantizer": {
            "type": "vq",
            "codebook_size": codebook_size,
            "codebook_dim": codebook_dim,
            "distance": distance,
            "commitment_weight": commitment_weight,
        },
        "imported_from": {
            "format": "llamagen-vq",
            "file": path.name,
            "state_dict_key": key,
            "preset": name,
            "distance": distance,
            "distance_chosen_by": reason,
        },
    }
    tokenizer = Tokenizer.from_config(config)
    fvq_state = llamagen_to_fvq_state_dict(state)
    result = tokenizer.load_state_dict(fvq_state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path} does not fit the architecture read from its shapes: missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    tokenizer.eval()
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer
