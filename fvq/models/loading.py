"""Load a tokenizer from what users point fvq at: an exported model folder or a training run."""

from __future__ import annotations

from pathlib import Path

import torch

from fvq.models.tokenizer import Tokenizer


def load_tokenizer(path: str | Path, map_location: str | torch.device = "cpu") -> Tokenizer:
    """A :class:`Tokenizer` in eval mode from ``path``, which may be:

    * an exported model folder (``config.json`` + ``model.safetensors``, from ``fvq export`` or ``save_pretrained``),
    * a training run folder (its newest ``checkpoints/step_*.pt``),
    * one training checkpoint file (``step_*.pt``).

    Training checkpoints keep the projector (e.g. the VQBridge); call ``.export()`` to fold it away.
    """
    from fvq.runs import latest_checkpoint, load_checkpoint

    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():
        return Tokenizer.from_pretrained(path).to(map_location).eval()
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"{path} holds neither an exported model (config.json + model.safetensors) nor training checkpoints "
                f"(checkpoints/step_*.pt)"
            )
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"no model or run found at {path}")
    state = load_checkpoint(path, map_location=map_location)
    if "config" not in state or "model" not in state:
        raise ValueError(f"{path} is not an fvq training checkpoint (expected 'config' and 'model' entries)")
    config = state["config"]
    tokenizer = Tokenizer.from_config({"model": config["model"], "quantizer": config["quantizer"]})
    tokenizer.load_state_dict(state["model"])
    return tokenizer.to(map_location).eval()
