"""Tokens to images: ``fvq decode FILE.safetensors --model MODEL --out DIR`` (or a token store folder: its view 0,
the plain centre crop of each image).

Checks that the token file was made by MODEL (the identity recorded by ``fvq encode``: SHA-256 of the exported
weights and a digest of the config; ``--force`` decodes anyway) and that every id lies in ``[0, codebook_size)``,
then decodes in batches and writes 8-bit PNGs named after the source files (``photos/cat.jpg`` ->
``DIR/photos/cat.png``), or ``000000.png``, ``000001.png``, ... when the file names none.
"""

from __future__ import annotations

import argparse

from fvq.commands.encode import add_model_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "tokens", metavar="FILE.safetensors|STORE", help="token file or token store (view 0) written by fvq encode"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs")
    add_model_arguments(parser)
    parser.add_argument("--force", action="store_true", help="decode tokens made by another model")
    parser.add_argument("--overwrite", action="store_true", help="replace existing PNGs")


def run(args: argparse.Namespace) -> int:
    from fvq.inference import (
        ForeignTokensError,
        check_tokens,
        existing_outputs,
        iter_decoded,
        load_model,
        load_tokens,
        output_names,
        write_images,
    )

    tokens = load_tokens(args.tokens)
    model = load_model(args.model, device=args.device)
    try:
        check_tokens(model, tokens, force=args.force)
    except ForeignTokensError as error:
        raise ValueError(f"{error} (here: --force)") from error
    names = output_names(tokens.sources, tokens.num_images)
    existing = existing_outputs(args.out, names)
    if existing and not args.overwrite:
        raise ValueError(
            f"{len(existing)} output files exist already (e.g. {existing[0]}); pass --overwrite or choose another --out"
        )
    batches = iter_decoded(model.tokenizer, tokens, batch_size=args.batch_size, progress=not args.no_progress)
    for start, images in batches:
        write_images(images, names[start : start + images.shape[0]], args.out)
    h, w = tokens.grid_shape
    size = f"{h * model.tokenizer.downsample_factor}x{w * model.tokenizer.downsample_factor}"
    print(f"decoded {tokens.num_images} images ({h}x{w} tokens -> {size} px)")
    print(f"wrote {args.out}/{names[0]}" + (f" ... {names[-1]}" if len(names) > 1 else ""))
    return 0
