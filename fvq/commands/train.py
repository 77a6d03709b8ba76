"""Train a model: ``fvq train CONFIG --out DIR [--resume] [key=value ...]``.

CONFIG is a YAML file or the name of a preset shipped with fvq (``fvq train --list`` shows them); its ``task:`` says
what it trains (``tokenizer`` by default). Every kind runs on the same engine, run folder and checkpoints. Overrides use
dotted keys, e.g. ``optim.lr=2e-4 quantizer.codebook_size=8192 max_steps=500``. For several processes launch the same
command under ``torchrun --nproc_per_node N -m fvq train ...``.
"""

from __future__ import annotations

import argparse

from fvq.training.config import CONFIG_DIR, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML file or preset name (see --list)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. optim.lr=2e-4")
    parser.add_argument("--out", help="run directory (logs, pictures, metrics.json, checkpoints/)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument(
        "--overwrite", action="store_true", help="delete a previous run's outputs in --out and start over"
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="STEPS",
        help="stop after this many optimizer steps in this invocation (a checkpoint is written; continue with "
        "--resume), e.g. for time-limited jobs",
    )
    parser.add_argument("--list", action="store_true", help="list the shipped presets and exit")


def run(args: argparse.Namespace) -> int:
    if args.list:
        for path in sorted(CONFIG_DIR.glob("*.yaml")):
            first = path.read_text().splitlines()[0].lstrip("# ").strip() if path.read_text() else ""
            print(f"{path.stem:24s} {first}")
        return 0
    if not args.config or not args.out:
        raise ValueError("usage: fvq train CONFIG --out DIR [--resume] [key=value ...]")
    import importlib

    from fvq.training.config import TASK_MODULES

    config = load_config(args.config, args.overrides)
    task = importlib.import_module(TASK_MODULES[config.task])
    result = task.train(config, args.out, resume=args.resume, max_steps=args.stop_after, overwrite=args.overwrite)
    if result.is_main:
        for line in task.summary(result):
            print(line)
        if result.skipped_steps:
            print(f"  {result.skipped_steps} steps were skipped because of a non-finite loss")
    return 0
