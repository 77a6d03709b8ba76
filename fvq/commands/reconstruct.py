"""Encode and decode in one go: ``fvq reconstruct IMAGES_OR_DIR... --model MODEL --out DIR``.

Crops and encodes the images as ``fvq encode`` does, decodes the tokens as ``fvq decode`` does (the PNGs are the
same), writes them to DIR named after the sources, and adds ``DIR/reconstruction_grid.png``: rows of originals,
each followed by the row of their reconstructions. ``--tokens FILE.safetensors`` also keeps the token file. Prints
the mean PSNR (RGB, 8-bit) of the reconstructions.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fvq.commands.encode import add_image_arguments, add_model_arguments, image_size_of, report_skipped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_image_arguments(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the reconstructions and the grid")
    add_model_arguments(parser)
    parser.add_argument("--tokens", metavar="FILE.safetensors", help="also write the token file")
    parser.add_argument("--grid", type=int, default=32, metavar="N", help="images shown in the grid (default 32)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _run(args: argparse.Namespace) -> int:
    from fvq.inference import OutputsExistError, collect_images, load_model, reconstruct_images

    sources = collect_images(args.inputs)
    model = load_model(args.model, device=args.device)
    try:
        report = reconstruct_images(
            model,
            sources,
            args.out,
            image_size=image_size_of(args, model),
            protocol=args.protocol,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            alpha=args.alpha,
            max_bad_fraction=args.max_bad_fraction,
            grid_images=args.grid,
            tokens_path=args.tokens or None,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except OutputsExistError as error:
        raise ValueError(f"{error} (here: --overwrite)") from error
    report_skipped(report.skipped, len(sources))
    if args.tokens:
        print(f"wrote tokens to {args.tokens}")
    mean = f"{report.mean_psnr:.2f} dB" if math.isfinite(report.mean_psnr) else "inf (exact)"
    size, count = report.image_size, len(report.sources)
    print(f"reconstructed {count} images ({size}x{size}, {report.protocol} crop): mean PSNR {mean}")
    print(f"wrote {count} PNGs to {Path(args.out)} and the grid {report.grid}")
    return 0


def run(args: argparse.Namespace) -> int:
    from fvq.data.images import TooManyBadFilesError

    try:
        return _run(args)
    except TooManyBadFilesError as error:
        raise ValueError(f"{error} (here: --max-bad-fraction)") from error
