"""Import a LlamaGen / FVQ-release VQGAN checkpoint: ``fvq import-llamagen CHECKPOINT.pt --out DIR``.

Reads the ``.pt`` file with ``torch.load(weights_only=True)``, reads the architecture from the tensor shapes, and
writes fvq's ``config.json`` + ``model.safetensors``. ``--source`` decides how codes are searched: ``llamagen``
(l2-normalised codes and latents, cosine distance), ``fvq`` (plain squared L2; FVQ's released VQGAN-format
tokenizers), or ``auto`` (the checkpoint's ``args.codebook_l2_norm`` when present, else cosine for codebook dims
<= 32 and L2 above). FVQ training checkpoints that still hold the bridge must be converted with the authors'
``convert_fullvq2vq.py`` first.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fvq.models.convert import SOURCES

    parser.add_argument("checkpoint", metavar="CHECKPOINT.pt", help="LlamaGen-layout VQ model checkpoint")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for config.json + model.safetensors")
    parser.add_argument("--source", choices=SOURCES, default="auto", help="code search of the source (default: auto)")
    parser.add_argument(
        "--state-dict-key", default=None, help="checkpoint entry holding the weights (default: ema, model, state_dict)"
    )
    parser.add_argument("--norm-groups", type=int, default=32, help="GroupNorm groups of the model (LlamaGen: 32)")
    parser.add_argument("--commitment-weight", type=float, default=0.25, help="recorded in the quantizer config")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder (replaces the two files)")


def run(args: argparse.Namespace) -> int:
    from fvq.inference import describe_bytes, model_identity
    from fvq.models.convert import import_llamagen_checkpoint

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.force)):
        raise ValueError(f"{out} is not an empty folder; choose an empty or new folder, or pass --force")
    tokenizer = import_llamagen_checkpoint(
        args.checkpoint,
        out,
        source=args.source,
        state_dict_key=args.state_dict_key,
        norm_groups=args.norm_groups,
        commitment_weight=args.commitment_weight,
    )
    info = tokenizer.config["imported_from"]
    h, w = tokenizer.latent_shape(256, 256)
    print(f"imported {args.checkpoint} (entry {info['state_dict_key'] or '(bare state dict)'})")
    print(
        f"  architecture: {info['preset'] or 'custom'} (downsampling {tokenizer.downsample_factor}, "
        f"{h}x{w} tokens at 256 px)"
    )
    print(
        f"  codebook:     {tokenizer.codebook_size:,} x {tokenizer.codebook_dim}, distance {info['distance']} "
        f"(chosen by {info['distance_chosen_by']})"
    )
    print(
        f"  parameters:   {tokenizer.num_parameters():,}, {describe_bytes((out / 'model.safetensors').stat().st_size)}"
    )
    print(f"  identity:     {model_identity(out)}")
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'}")
    return 0
