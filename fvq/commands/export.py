"""Export a training run for inference: ``fvq export RUN_OR_CHECKPOINT --out DIR``.

Loads the newest checkpoint of a run folder (or the checkpoint file given), folds the codebook projector (e.g. FVQ's
VQBridge) into a plain codebook, writes ``config.json`` + ``model.safetensors`` (each atomically), reads the folder
back and checks that it gives identical indices and reconstructions on probe images and latent grids. The folder
then loads with ``Tokenizer.from_pretrained(DIR)`` or ``fvq encode/decode --model DIR``.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="training run folder or checkpoint (step_*.pt)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for config.json + model.safetensors")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder (replaces the two files)")
    parser.add_argument("--device", default="cpu", help="device for the verification passes: cpu, cuda, auto")
    parser.add_argument(
        "--probes", type=int, default=4, metavar="N", help="probe images per kind (noise, smooth) and latent grids"
    )


def run(args: argparse.Namespace) -> int:
    from fvq.inference import ExportVerificationError, OutputFolderNotEmptyError, describe_bytes, export_model

    try:
        report = export_model(args.source, args.out, force=args.force, device=args.device, num_probes=args.probes)
    except ExportVerificationError as error:
        print(f"fvq export: error: {error}; nothing was kept in {args.out}", file=sys.stderr)
        return 1
    except OutputFolderNotEmptyError as error:
        raise ValueError(f"{error} (here: --force)") from error
    step = f" (step {report.step})" if report.step is not None else ""
    print(f"exported {report.source}{step}")
    print(
        f"  parameters:  {report.parameters_before:,} -> {report.parameters_after:,} "
        f"({report.parameters_dropped:,} projector parameters folded into the codebook)"
    )
    print(
        f"  file sizes:  source {describe_bytes(report.source_bytes)}, model weights "
        f"{describe_bytes(report.weights_bytes_before)} -> {describe_bytes(report.weights_bytes_after)} exported"
    )
    print(
        f"  verified:    identical indices and reconstructions on {report.probe_images} probe images and "
        f"{report.probe_latents} latent grids ({report.distinct_codes} distinct codes in play)"
    )
    print(f"  identity:    {report.identity}")
    print(f"wrote {report.out_dir / 'config.json'} and {report.out_dir / 'model.safetensors'}")
    return 0
