"""Images to tokens: ``fvq encode IMAGES_OR_DIR... --model MODEL --out FILE.safetensors`` (a token file) or
``--out DIR`` (a token store for training the generator, e.g. ``fvq encode imagenet/train --model M --out STORE
--labels subfolders --views tencrop+1.05``, also under ``torchrun``).

Inputs are image files and folders (searched recursively for .jpg/.jpeg/.png/.webp, sorted, hidden files skipped).
Each image is decoded to RGB, centre-cropped to ``--image-size`` (default: the model's training image size when it
was recorded) by ``--protocol`` (``llamagen``: short side resized then centre crop; ``fvq``: centre crop of the
raw image), and encoded in batches. Unreadable files are skipped, named in a warning and counted.

MODEL is an exported folder, a training run folder or a checkpoint (exported on the fly: identical tokens). The
token file holds ``indices`` (int32, (N, h, w) or (N, h, w, c)) and metadata naming the model, the crop and the
source files; ``fvq decode`` turns it back into images.

A token store (format version 2) is a folder of shards memory-mapped by the generator's training: ``tokens-K.npy``
(N, V, h, w) in uint16 (int32 above 65,536 codes), ``labels-K.npy``, ``sources-K.json`` and ``meta.json``.
``--views`` adds augmented views (``flip``; ``tencrop``: LlamaGen's ten crops of the centre crop at 1.1x;
``tencrop+1.05``: ten more at 1.05x), ``--labels subfolders`` class labels from an ImageNet-style folder (sorted
subfolder names -> ids 0..C-1). Under ``torchrun`` each process encodes a contiguous run of shards; the store does not
depend on the number of processes. ``--resume`` finishes an interrupted encoding, keeping the complete shards.
"""

from __future__ import annotations

import argparse
import os
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
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument(
        "--out",
        metavar="FILE.safetensors|DIR",
        help="token file to write (a .safetensors name), or token store folder (any other name)",
    )
    out.add_argument("--store", metavar="DIR", help="token store folder to write (whatever its name)")
    add_model_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing token file or store")
    store = parser.add_argument_group("token stores (--out DIR or --store DIR)")
    store.add_argument(
        "--views",
        default="center",
        help="views per image: center (default), flip (and its mirror), tencrop (LlamaGen's 10 crops at 1.1x), "
        "tencrop+1.05 (20: a second set at 1.05x), tencrop@SCALE[+SCALE...]",
    )
    store.add_argument(
        "--labels",
        choices=("none", "subfolders"),
        default="none",
        help="class labels: none, or subfolders (one input folder with one subfolder per class, ImageNet layout)",
    )
    store.add_argument(
        "--shard-size", type=int, default=None, help="input images per shard (default 10,000); fixes the shards"
    )
    store.add_argument("--resume", action="store_true", help="finish an interrupted encoding (keeps complete shards)")


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


def _writes_store(args: argparse.Namespace) -> bool:
    return args.store is not None or Path(args.out).suffix != ".safetensors"


def _run(args: argparse.Namespace) -> int:
    if _writes_store(args):
        return _run_store(args)
    from fvq.inference import collect_images, encode_images, load_model, save_tokens

    out = Path(args.out)
    store_only = [
        flag
        for flag, used in (
            ("--views", args.views != "center"),
            ("--labels", args.labels != "none"),
            ("--shard-size", args.shard_size is not None),
            ("--resume", args.resume),
            ("torchrun", int(os.environ.get("WORLD_SIZE", "1")) > 1),
        )
        if used
    ]
    if store_only:
        raise ValueError(
            f"{', '.join(store_only)} need a token store: give --out DIR (a folder) instead of the token file {out}"
        )
    if out.exists() and not args.overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
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


def _run_store(args: argparse.Namespace) -> int:
    from fvq.distributed import cleanup_distributed, init_distributed
    from fvq.inference import DEFAULT_SHARD_SIZE, encode_store, load_model

    out = Path(args.store if args.store is not None else args.out)
    ctx = init_distributed(args.device)
    try:
        model = load_model(args.model, device=ctx.device)
        report = encode_store(
            model,
            args.inputs,
            out,
            image_size=image_size_of(args, model),
            protocol=args.protocol,
            views=args.views,
            labels=args.labels,
            shard_size=args.shard_size if args.shard_size is not None else DEFAULT_SHARD_SIZE,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            alpha=args.alpha,
            max_bad_fraction=args.max_bad_fraction,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        if ctx.is_main:
            meta = report.meta
            report_skipped(report.skipped, int(meta["num_inputs"]))
            h, w = meta["grid"]
            codes = f" x {meta['codes_per_position']} codes" if meta["codes_per_position"] > 1 else ""
            classes = f", {len(meta['class_names'])} classes" if meta["class_names"] else ", no labels"
            size = meta["image_size"]
            print(
                f"encoded {meta['num_images']:,} images ({size}x{size}, {len(meta['view_names'])} view(s): "
                f"{meta['views']}) to {h}x{w}{codes} tokens each{classes}; {report.num_shards} shard(s) of "
                f"{meta['dtype']} ({len(report.encoded)} encoded by this process, {len(report.reused)} kept), "
                f"{ctx.world_size} process(es)"
            )
            print(f"model {model.identity}" + (" (exported on the fly)" if model.exported_on_the_fly else ""))
            print(f"wrote {out}/meta.json")
    finally:
        cleanup_distributed()
    return 0


def run(args: argparse.Namespace) -> int:
    from fvq.data.images import TooManyBadFilesError

    try:
        return _run(args)
    except TooManyBadFilesError as error:
        raise ValueError(f"{error} (here: --max-bad-fraction)") from error
