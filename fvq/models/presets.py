"""Named encoder/decoder sizes and the model-config resolver.

A model config is a plain dict: either ``{"preset": name, **overrides}`` or the full set of keys in
:data:`MODEL_DEFAULTS`. :func:`resolve_model_config` turns either form into the full, explicit dict that is saved in
``config.json``, so a saved model never depends on this table.

Presets:

* ``vq16``: LlamaGen VQ-16 (downsampling 16; 256 px -> 16x16 tokens). ch 128, ch_mult (1, 1, 2, 2, 4), 2 residual
  blocks per encoder level and 3 per decoder level, z_channels 256, GroupNorm(32), attention at the lowest level and
  in the middle. About 72 M parameters in the encoder and decoder.
* ``vq8``: LlamaGen VQ-8 (downsampling 8), ch_mult (1, 2, 2, 4).
* ``small_f8`` / ``small_f16``: a quarter-width, one-block-per-level variant for quick GPU runs.
* ``tiny_f4`` / ``tiny_f8``: CPU-sized models for tests and smoke runs on 32-64 px crops (ch 32, one residual block per
  level, attention only in the middle, GroupNorm(8)).
* ``var_vqvae``: VAR's VQVAE (Tian et al., 2024; ``build_vae_var`` in github.com/FoundationVision/VAR): the same
  taming layout as VQ-16 at ch 160, ch_mult (1, 1, 2, 2, 4), 2 residual blocks per encoder level and 3 per decoder
  level, attention at the 16x16 level and in the middle, GroupNorm(32), z_channels ``Cvae`` = 32, and 3x3 convolutions
  ``Cvae -> Cvae`` right before and after the quantizer (``latent_conv_kernel_size: 3``). 256 px -> 16x16x32 latents,
  the input of VAR's multi-scale quantizer (scales 1 ... 16). fvq's tokenizer keeps its 1x1 ``quant_conv`` /
  ``post_quant_conv`` (``Cvae -> D``) between these convolutions and the quantizer: at D = 32 they are two extra
  linear maps VAR does not have; at D = 256 (FVQ (VAR), Table 4) they widen the latents to the codebook.
* ``tiny_var_f4``: ``tiny_f4`` with VAR's latent layout (z_channels 32, 3x3 convolutions around the quantizer), for
  the multi-scale runs on 32 px crops (8x8 latents, scales 1 ... 8).
"""

from __future__ import annotations

import copy
from typing import Any

from fvq.models.autoencoder import Decoder, Encoder

MODEL_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 2,
    "decoder_num_res_blocks": None,  # None: num_res_blocks + 1, as LlamaGen
    "z_channels": 256,
    "attn_levels": None,  # None: the last (lowest-resolution) level only, as LlamaGen
    "mid_attention": True,
    "norm_groups": 32,
    "dropout": 0.0,
    "latent_conv_kernel_size": None,  # None: no convolution around the quantizer besides the 1x1 ones (LlamaGen)
}
# keys left out of a resolved config while they hold their default, so configs saved before they existed stay equal
_OMITTED_WHEN_DEFAULT = ("latent_conv_kernel_size",)

PRESETS: dict[str, dict[str, Any]] = {
    "vq16": {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 256},
    "vq8": {"ch": 128, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 2, "z_channels": 256},
    "small_f16": {
        "ch": 64,
        "ch_mult": [1, 1, 2, 2, 4],
        "num_res_blocks": 1,
        "z_channels": 256,
        "norm_groups": 32,
    },
    "small_f8": {"ch": 64, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 1, "z_channels": 256, "norm_groups": 32},
    "tiny_f4": {
        "ch": 32,
        "ch_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "decoder_num_res_blocks": 1,
        "z_channels": 64,
        "attn_levels": [],
        "norm_groups": 8,
    },
    "tiny_f8": {
        "ch": 32,
        "ch_mult": [1, 2, 2, 4],
        "num_res_blocks": 1,
        "decoder_num_res_blocks": 1,
        "z_channels": 64,
        "attn_levels": [],
        "norm_groups": 8,
    },
    "var_vqvae": {
        "ch": 160,
        "ch_mult": [1, 1, 2, 2, 4],
        "num_res_blocks": 2,
        "decoder_num_res_blocks": 3,
        "z_channels": 32,
        "attn_levels": [4],
        "mid_attention": True,
        "norm_groups": 32,
        "latent_conv_kernel_size": 3,
    },
    "tiny_var_f4": {
        "ch": 32,
        "ch_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "decoder_num_res_blocks": 1,
        "z_channels": 32,
        "attn_levels": [],
        "norm_groups": 8,
        "latent_conv_kernel_size": 3,
    },
}


def available_presets() -> list[str]:
    """Names accepted as ``{"preset": name}``."""
    return sorted(PRESETS)


def resolve_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """Expand a model config to the full explicit dict (every key of :data:`MODEL_DEFAULTS`, no ``None`` left).

    Args:
        config: ``{"preset": name, **overrides}`` or explicit keys (missing keys take :data:`MODEL_DEFAULTS`).

    Returns:
        A new dict with lists (not tuples) so that it round-trips through JSON unchanged.
    """
    if not isinstance(config, dict):
        raise TypeError(f"model config must be a dict, got {type(config).__name__}")
    config = copy.deepcopy(config)
    preset = config.pop("preset", None)
    unknown = sorted(set(config) - set(MODEL_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; expected a subset of {sorted(MODEL_DEFAULTS)}")
    full = copy.deepcopy(MODEL_DEFAULTS)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; expected one of {available_presets()}")
        full.update(copy.deepcopy(PRESETS[preset]))
    full.update(config)
    full["ch_mult"] = [int(m) for m in full["ch_mult"]]
    if full["decoder_num_res_blocks"] is None:
        full["decoder_num_res_blocks"] = int(full["num_res_blocks"]) + 1
    if full["attn_levels"] is None:
        full["attn_levels"] = [len(full["ch_mult"]) - 1]
    full["attn_levels"] = [int(i) for i in full["attn_levels"]]
    for key in _OMITTED_WHEN_DEFAULT:
        if full[key] is None:
            del full[key]
    return full


def preset_name(config: dict[str, Any]) -> str | None:
    """The preset whose resolved config equals ``config`` (after resolution), or ``None``."""
    resolved = resolve_model_config(config)
    for name in available_presets():
        if resolve_model_config({"preset": name}) == resolved:
            return name
    return None


def build_autoencoder(config: dict[str, Any]) -> tuple[Encoder, Decoder]:
    """Build the encoder and decoder described by a model config (preset name or explicit keys)."""
    cfg = resolve_model_config(config)
    shared = {
        "ch": cfg["ch"],
        "ch_mult": cfg["ch_mult"],
        "z_channels": cfg["z_channels"],
        "attn_levels": cfg["attn_levels"],
        "mid_attention": cfg["mid_attention"],
        "norm_groups": cfg["norm_groups"],
        "dropout": cfg["dropout"],
        "latent_conv_kernel_size": cfg.get("latent_conv_kernel_size"),
    }
    encoder = Encoder(in_channels=cfg["in_channels"], num_res_blocks=cfg["num_res_blocks"], **shared)
    decoder = Decoder(out_channels=cfg["in_channels"], num_res_blocks=cfg["decoder_num_res_blocks"], **shared)
    return encoder, decoder
