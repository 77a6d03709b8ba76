"""Autoregressive generation over fvq tokens: LlamaGen's class-conditional GPT, its presets, sampling, import."""

from fvq.generation.gpt import (
    GPT,
    PRESETS,
    GPTConfig,
    GPTOutput,
    available_presets,
    build_gpt,
    gpt_config,
    preset_name,
)
from fvq.generation.layout import TokenLayout, check_token_layout, grid_to_tokens, tokens_to_grid
from fvq.generation.llamagen import gpt_from_llamagen_state_dict, import_llamagen_gpt
from fvq.generation.sampling import CFG_SCHEDULES, generate, guidance_scale

__all__ = [
    "CFG_SCHEDULES",
    "GPT",
    "GPTConfig",
    "GPTOutput",
    "PRESETS",
    "TokenLayout",
    "available_presets",
    "build_gpt",
    "check_token_layout",
    "generate",
    "gpt_config",
    "gpt_from_llamagen_state_dict",
    "grid_to_tokens",
    "guidance_scale",
    "import_llamagen_gpt",
    "preset_name",
    "tokens_to_grid",
]
