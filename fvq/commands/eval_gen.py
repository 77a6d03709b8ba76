"""Score generated images as the ADM evaluator does: ``fvq eval-gen SAMPLES --ref REF.npz [--out DIR]``.

SAMPLES is a folder of images or an ADM-layout .npz (arr_0: uint8 N x H x W x 3; optional arr_1 class labels).
REF is an ADM reference batch (.npz with mu/sigma, mu_s/sigma_s and arr_0), e.g. VIRTUAL_imagenet256_labeled.npz.
Reports FID and sFID against the reference's stored statistics, the Inception Score (needs --inception-is, see
below; otherwise reported as unavailable) and precision/recall (k = 3 manifolds of the reference's arr_0 and all
samples). Writes metrics.json and metrics.md to --out (default ./eval-gen) and prints the table.

Build a reference batch from real images (ADM centre crop to --image-size, stored as arr_0 with the statistics):
  fvq eval-gen --make-ref FOLDER --out REF.npz [--image-size 256]

Inception Score: give pytorch-fid's pt_inception-2015-12-05-6726825d.pth with --inception-is PATH or
$FVQ_IS_INCEPTION_WEIGHTS (also found in torch.hub's checkpoint folder when pytorch-fid or torch-fidelity fetched it).

Features are cached (default <fvq cache>/generation, keyed by the samples' content and the Inception), so scoring the
same samples against another reference costs no second Inception pass. Several processes:
  torchrun --nproc_per_node N -m fvq eval-gen SAMPLES --ref REF.npz
(each rank computes the features of a slice; rank 0 computes the figures and writes the files).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("samples", nargs="?", metavar="SAMPLES", help="image folder or ADM-layout .npz of samples")
    parser.add_argument("--ref", metavar="REF.npz", help="ADM reference batch to score against")
    parser.add_argument("--make-ref", metavar="FOLDER", help="build a reference batch from this folder of real images")
    parser.add_argument("--out", help="output folder (scoring; default ./eval-gen) or the .npz to write (--make-ref)")
    parser.add_argument("--image-size", type=int, default=256, help="--make-ref: side S of the centre crop")
    parser.add_argument("--inception-is", metavar="PATH", help="IS classifier weights (pytorch-fid's .pth)")
    parser.add_argument(
        "--inception-is-sha256",
        metavar="HEX",
        help="accept an IS weight file with this SHA-256 instead of pytorch-fid's",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception batch on each process")
    parser.add_argument("--num-workers", type=int, default=2, help="image-decoding workers for folders")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to compute")
    parser.add_argument("--cache-dir", metavar="DIR", help="feature cache folder (default <fvq cache>/generation)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    parser.add_argument("--is-split-size", type=int, default=5000, help="samples per IS split (ADM: 5000)")
    parser.add_argument("--is-seed", type=int, default=0, help="seed of the shuffle before the IS splits")
    parser.add_argument(
        "--is-file-order", action="store_true", help="split the IS in file order without shuffling (ADM's behaviour)"
    )
    parser.add_argument("--k", type=int, default=3, help="precision/recall neighbourhood size (ADM: 3)")
    parser.add_argument("--pr-batch-size", type=int, default=10000, help="precision/recall distance block size")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_arguments(args: argparse.Namespace) -> None:
    for name in ("image_size", "batch_size", "is_split_size", "k", "pr_batch_size"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.no_cache and args.cache_dir:
        raise ValueError("--cache-dir and --no-cache contradict each other; give one")
    if args.make_ref:
        if args.samples or args.ref:
            raise ValueError("--make-ref builds a reference batch and takes neither SAMPLES nor --ref; run them apart")
        if not args.out:
            raise ValueError("--make-ref needs --out REF.npz (the reference batch to write)")
        if not Path(args.make_ref).is_dir():
            raise FileNotFoundError(f"--make-ref {args.make_ref} is not a folder of images")
        return
    if not args.samples:
        raise ValueError(
            "give SAMPLES (an image folder or an .npz) and --ref REF.npz, or --make-ref FOLDER --out REF.npz"
        )
    if not args.ref:
        raise ValueError(
            "--ref REF.npz is required: an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) or one built "
            "with --make-ref"
        )
    if not Path(args.samples).exists():
        raise FileNotFoundError(f"samples {args.samples} do not exist")
    if not Path(args.ref).is_file():
        raise FileNotFoundError(
            f"reference batch {args.ref} does not exist; download ADM's or build one with "
            "--make-ref FOLDER --out REF.npz"
        )
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder for metrics.json and metrics.md")


def run(args: argparse.Namespace) -> int:
    from fvq.distributed import cleanup_distributed, init_distributed
    from fvq.evaluation.generation import evaluate_samples, make_reference_batch

    _check_arguments(args)
    cache: str | bool = False if args.no_cache else (args.cache_dir or True)
    ctx = init_distributed(args.device)
    try:
        if args.make_ref:
            ref = make_reference_batch(
                args.make_ref,
                args.out,
                image_size=args.image_size,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                device=ctx.device,
                cache=cache,
                progress=not args.quiet,
            )
            if ctx.is_main:
                print(
                    f"wrote {ref.path}: {ref.num_images} images of {args.image_size}x{args.image_size} (ADM centre "
                    f"crop) with mu/sigma and mu_s/sigma_s; sha256 {ref.sha256}"
                )
            return 0
        result = evaluate_samples(
            args.samples,
            args.ref,
            classifier=args.inception_is,
            classifier_sha256=args.inception_is_sha256,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=ctx.device,
            cache=cache,
            is_split_size=args.is_split_size,
            is_seed=None if args.is_file_order else args.is_seed,
            k=args.k,
            pr_batch_size=args.pr_batch_size,
            progress=not args.quiet,
        )
        result.info["arguments"] = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
        if ctx.is_main:
            json_path, md_path = result.save(args.out or "eval-gen")
            print(result.to_markdown())
            print(f"wrote {json_path} and {md_path}")
    finally:
        cleanup_distributed()
    return 0
