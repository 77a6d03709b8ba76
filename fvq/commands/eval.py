"""Evaluate a tokenizer: ``fvq eval MODEL_OR_RUN --data PATH|embedded [--protocol llamagen|fvq] [...]``.

Reconstructs every image of the set once and reports rFID, LPIPS (VGG and AlexNet), PSNR (RGB and Y), SSIM (correct,
and the published data_range=2 variant under its own name) and codebook usage / perplexity / dead codes over the whole
set. MODEL_OR_RUN is an exported model folder, a training run folder (newest checkpoint) or a checkpoint file.

Protocols (the crop of each evaluation image, side S = --image-size):
  llamagen  short side resized to S, centre crop S x S (LlamaGen / ADM)
  fvq       centre crop S x S of the raw image, no resizing (FVQ)
--data embedded evaluates on the embedded held-out photos (their own fixed crops; no download).

Writes metrics.json and metrics.md to --out (default: RUN/eval for a run, else ./eval) and prints the table.
For several processes: torchrun --nproc_per_node N -m fvq eval ... (gloo on CPU, NCCL on GPUs); each rank
reconstructs a disjoint share of the set and every statistic is summed over ranks.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fvq.evaluation.evaluate import PROTOCOLS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL_OR_RUN", help="exported model folder, run folder or checkpoint file")
    parser.add_argument(
        "--data",
        help="image folder, tar shards (e.g. '/data/val-{000000..000049}.tar') or 'embedded' (the held-out photos "
        "shipped with fvq); default: the run's own data config",
    )
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="llamagen", help="evaluation crop (see above)")
    parser.add_argument("--image-size", type=int, help="side S of the evaluated images (default: the run's, else 256)")
    parser.add_argument("--num-images", type=int, help="evaluate only the first N images (default: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass on each process")
    parser.add_argument(
        "--reference-stats",
        metavar="FILE",
        help="rFID reference statistics: reused when FILE exists (checked to match this set), else computed and "
        "written there; an .npz with mu/sigma (ADM reference batch) is read as is",
    )
    parser.add_argument("--out", help="output folder (default: RUN/eval for a run, else ./eval)")
    parser.add_argument("--psnr-channel", choices=("rgb", "y"), default="rgb", help="channel of the headline PSNR")
    parser.add_argument("--no-fid", action="store_true", help="skip rFID (no FID Inception needed)")
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS (no LPIPS weights needed)")
    parser.add_argument("--no-usage", action="store_true", help="skip codebook usage")
    parser.add_argument(
        "--no-export",
        action="store_true",
        help="evaluate the checkpoint as trained (default: fold a codebook projector such as VQBridge into a plain "
        "codebook first; the outputs are identical and the evaluation is faster)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to compute")
    parser.add_argument("--num-workers", type=int, default=2, help="data-loading workers per process")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def data_config_from_arg(data: str | None, run_config: dict[str, Any]) -> dict[str, Any]:
    """The data config of ``--data``: ``embedded``, an image folder, or tar shards (a ``.tar`` file or pattern)."""
    if data is None:
        if "data" not in run_config:
            raise ValueError("--data is required (an image folder, tar shards, or 'embedded')")
        config = {k: v for k, v in dict(run_config["data"]).items() if k not in ("scale_range", "samples_per_epoch")}
        return config
    if data == "embedded":
        return {"type": "embedded"}
    path = Path(data)
    if path.is_dir():
        return {"type": "folder", "val_path": str(path)}
    if any(c in data for c in "{*") or (data.endswith(".tar") and path.is_file()):
        return {"type": "shards", "val_path": data}
    if path.is_file():
        raise ValueError(f"--data {data} is a file; give an image folder, tar shards (*.tar) or 'embedded'")
    raise FileNotFoundError(f"--data {data} does not exist; give an image folder, tar shards or 'embedded'")


def run(args: argparse.Namespace) -> int:
    from fvq.distributed import cleanup_distributed, init_distributed
    from fvq.evaluation.evaluate import evaluate
    from fvq.inference import load_model
    from fvq.runs import RunFolder

    for name in ("image_size", "num_images", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    model_path = Path(args.model)
    if not model_path.exists():
        raise FileNotFoundError(f"no model or run found at {model_path}")
    run = RunFolder.containing(model_path)
    run_config = run.read_config() if run is not None else {}
    data = data_config_from_arg(args.data, run_config)
    image_size = args.image_size or (run_config.get("data") or {}).get("image_size") or 256
    metrics = [
        m
        for m, skip in (
            ("rfid", args.no_fid),
            ("lpips_vgg", args.no_lpips),
            ("lpips_alex", args.no_lpips),
            ("psnr", False),
            ("ssim", False),
            ("usage", args.no_usage),
        )
        if not skip
    ]
    out_dir = Path(args.out) if args.out else (run.eval_dir if run is not None else Path("eval"))

    ctx = init_distributed(args.device)
    try:
        tokenizer = load_model(model_path, device=ctx.device, export=not args.no_export).tokenizer
        result = evaluate(
            tokenizer,
            data,
            protocol=args.protocol,
            image_size=image_size,
            num_images=args.num_images,
            batch_size=args.batch_size,
            metrics=metrics,
            reference_stats=args.reference_stats,
            psnr_channel=args.psnr_channel,
            device=ctx.device,
            num_workers=args.num_workers,
            progress=not args.quiet,
        )
        result.info.update(
            model=str(model_path),
            arguments={k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"},
        )
        if ctx.is_main:
            json_path, md_path = result.save(out_dir)
            print(result.to_markdown())
            print(f"wrote {json_path} and {md_path}")
    finally:
        cleanup_distributed()
    return 0
