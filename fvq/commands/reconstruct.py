"""Encode and decode in one go: ``fvq reconstruct IMAGES_OR_DIR... --model MODEL --out DIR``.

Crops and encodes the images as ``fvq encode`` does, decodes the tokens as ``fvq decode`` does (the PNGs are the
same), writes them to DIR named after the sources, and adds ``DIR/reconstruction_grid.png``: rows of originals,
each followed by the row of their reconstructions. ``--tokens FILE.safetensors`` also keeps the token file. Prints
the mean PSNR (RGB, 8-bit) of the reconstructions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fvq.commands.encode import add_image_arguments, add_model_arguments, report_skipped

GRID_NAME = "reconstruction_grid.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_image_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the reconstructions and the grid")
    add_model_arguments(parser)
    parser.add_argument("--tokens", metavar="FILE.safetensors", help="also write the token file")
    parser.add_argument("--grid", type=int, default=32, metavar="N", help="images shown in the grid (default 32)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _run(args: argparse.Namespace) -> int:
    import torch

    from fvq.data.images import BadFilePolicy
    from fvq.evaluation.metrics import psnr
    from fvq.tokenize import (
        TokenFile,
        collect_images,
        existing_outputs,
        iter_encoded,
        load_model,
        output_names,
        save_tokens,
        write_images,
    )
    from fvq.visualize import save_reconstruction_grid

    out = Path(args.out)
    sources = collect_images(args.inputs)
    names = output_names([s.name for s in sources], len(sources))
    targets = [*names, GRID_NAME]
    if GRID_NAME in names:
        raise ValueError(f"an input is named like the grid file {GRID_NAME}; rename it or write elsewhere")
    existing = existing_outputs(out, targets) + (
        [Path(args.tokens)] if args.tokens and Path(args.tokens).exists() else []
    )
    if existing and not args.overwrite:
        raise ValueError(
            f"{len(existing)} outputs exist already (e.g. {existing[0]}); pass --overwrite or choose another --out"
        )
    model = load_model(args.model, device=args.device)
    image_size = args.image_size or model.image_size
    if image_size is None:
        raise ValueError("--image-size is required: the model records no training image size (e.g. --image-size 256)")
    protocol = args.protocol or model.protocol or "llamagen"
    tokenizer = model.tokenizer
    device = tokenizer.quant_conv.weight.device
    policy = BadFilePolicy(max_bad_fraction=args.max_bad_fraction, min_seen=min(100, len(sources)))
    policy.description = "the input images"
    kept, skipped, chunks, grid_originals, grid_recons, scores = [], [], [], [], [], []
    for batch in iter_encoded(
        tokenizer,
        sources,
        image_size=image_size,
        protocol=protocol,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        alpha=args.alpha,
        bad_files=policy,
        progress=not args.no_progress,
    ):
        skipped.extend(batch.skipped)
        if not batch.names:
            continue
        with torch.inference_mode():
            recon = tokenizer.decode(batch.indices.to(device)).clamp(-1, 1).float().cpu()  # (B, 3, S, S)
        write_images(recon, [names[p] for p in batch.positions], out)
        scores.append(psnr(batch.images, recon))
        kept.extend(batch.names)
        chunks.append(batch.indices)
        room = args.grid - sum(x.shape[0] for x in grid_originals)
        if room > 0:
            grid_originals.append(batch.images[:room])
            grid_recons.append(recon[:room])
    report_skipped(skipped, len(sources))
    if not kept:
        raise ValueError(f"none of the {len(sources)} input files could be decoded as an image")
    grid = save_reconstruction_grid(
        torch.cat(grid_originals), torch.cat(grid_recons), out / GRID_NAME, nrow=min(8, len(kept))
    )
    if args.tokens:
        tokens = TokenFile(
            indices=torch.cat(chunks),
            codebook_size=tokenizer.codebook_size,
            model_identity=model.identity,
            sources=kept,
            image_size=image_size,
            protocol=protocol,
            downsample_factor=tokenizer.downsample_factor,
            skipped=skipped,
            model_weights_sha256=model.weights_sha256,
            model_config_sha256=model.config_sha256,
        )
        save_tokens(args.tokens, tokens)
        print(f"wrote tokens to {args.tokens}")
    values = torch.cat(scores)
    finite = values[torch.isfinite(values)]
    mean = f"{float(finite.mean()):.2f} dB" if finite.numel() else "inf (exact)"
    print(f"reconstructed {len(kept)} images ({image_size}x{image_size}, {protocol} crop): mean PSNR {mean}")
    print(f"wrote {len(kept)} PNGs to {out} and the grid {grid}")
    return 0


def run(args: argparse.Namespace) -> int:
    from fvq.data.images import TooManyBadFilesError

    try:
        return _run(args)
    except TooManyBadFilesError as error:
        raise ValueError(f"{error} (here: --max-bad-fraction)") from error
