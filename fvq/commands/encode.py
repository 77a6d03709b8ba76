"""Images to tokens: ``fvq encode IMAGES_OR_DIR... --model MODEL --out FILE.safetensors``.

Inputs are image files and folders (searched recursively for .jpg/.jpeg/.png/.webp, sorted, hidden files skipped).
Each image is decoded to RGB, centre-cropped to ``--image-size`` (default: the model's training image size when it
was recorded) by ``--protocol`` (``llamagen``: short side resized then centre crop; ``fvq``: centre crop of the
raw image), and encoded in batches. Unreadable files are skipped, named in a warning and counted.

MODEL is an exported folder, a training run folder or a checkpoint (exported on the fly: identical tokens). The
token file holds ``indices`` (int32, (N, h, w) or (N, h, w, c)) and metadata naming the model, the crop and the
source files; ``fvq decode`` turns it back into images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fvq.data.transforms import EVAL_CROPS

if TYPE_CHECKING:
    from fvq.inference import LoadedModel


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported model folder, training run folder or checkpoint")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIR", help="image files and/or folders")
    parser.add_argument(
        "--image-size", type=int, default=None, help="crop size (default: the model's training image size)"
    )
    parser.add_argument(
        "--protocol",
        choices=list(EVAL_CROPS),
        default=None,
        help="crop protocol: llamagen (resize short side, centre crop) or fvq (centre crop, no resize); default: "
        "the model's evaluation crop when recorded, else llamagen",
    )
    parser.add_argument("--num-workers", type=int, default=0, help="processes decoding images (default 0)")
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=1.0,
        help="stop when more than this fraction of the files are unreadable (default 1: skip them all)",
    )
    parser.add_argument("--alpha", choices=("white", "drop"), default="white", help="transparency: over white, or drop")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_image_arguments(parser)
    parser.add_argument("--out", required=True, metavar="FILE.safetensors", help="token file to write")
    add_model_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing token file")


def report_skipped(skipped: list[str], total: int) -> None:
    if skipped:
        shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        print(
            f"warning: skipped {len(skipped)} of {total} files that are not readable images: {shown}", file=sys.stderr
        )


def image_size_of(args: argparse.Namespace, model: LoadedModel) -> int:
    """``--image-size``, else the training image size recorded for the model."""
    image_size = args.image_size if args.image_size is not None else model.image_size
    if image_size is None:
        raise ValueError("--image-size is required: the model records no training image size (e.g. --image-size 256)")
    return image_size


def _run(args: argparse.Namespace) -> int:
    from fvq.inference import collect_images, encode_images, load_model, save_tokens

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must name a .safetensors file, got {out}")
    sources = collect_images(args.inputs)
    model = load_model(args.model, device=args.device)
    tokens = encode_images(
        model,
        sources,
        image_size=image_size_of(args, model),
        protocol=args.protocol,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        alpha=args.alpha,
        max_bad_fraction=args.max_bad_fraction,
        progress=not args.no_progress,
    )
    save_tokens(out, tokens)
    report_skipped(tokens.skipped, len(sources))
    h, w = tokens.grid_shape
    codes = f" x {tokens.codes_per_position} codes" if tokens.codes_per_position > 1 else ""
    used = int(tokens.indices.unique().numel())
    print(
        f"encoded {tokens.num_images} images ({tokens.image_size}x{tokens.image_size}, {tokens.protocol} crop) to "
        f"{h}x{w}{codes} tokens each; {used} of {tokens.codebook_size:,} codes used"
    )
    print(f"model {model.identity}" + (" (exported on the fly)" if model.exported_on_the_fly else ""))
    print(f"wrote {out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from fvq.data.images import TooManyBadFilesError

    try:
        return _run(args)
    except TooManyBadFilesError as error:
        raise ValueError(f"{error} (here: --max-bad-fraction)") from error
