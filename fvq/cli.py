"""The ``fvq`` command. Each subcommand lives in a module with ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). A module is imported only when its command is used.
COMMANDS: dict[str, tuple[str, str]] = {
    "toy": ("fvq.commands.toy", "the paper's toy experiment (Figure 2): STE vs linear projector vs VQBridge"),
    "bench": ("fvq.commands.bench", "benchmarks: nearest-code search, quantizers"),
    "train": ("fvq.commands.train", "train a tokenizer from a YAML config (CPU, or many GPUs under torchrun)"),
    "eval": ("fvq.commands.eval", "reconstruct a set and report rFID, LPIPS, PSNR, SSIM and codebook usage"),
    "eval-gen": ("fvq.commands.eval_gen", "score generated images as ADM does: FID, sFID, IS, precision, recall"),
    "export": ("fvq.commands.export", "export a training run to config.json + model.safetensors (projector folded)"),
    "import-llamagen": ("fvq.commands.import_checkpoint", "import a LlamaGen / FVQ-release VQGAN checkpoint"),
    "encode": ("fvq.commands.encode", "images (files or folders) to a token file"),
    "decode": ("fvq.commands.decode", "a token file back to PNG images"),
    "reconstruct": ("fvq.commands.reconstruct", "encode and decode images, with a side-by-side grid"),
    "sample": ("fvq.commands.sample", "class-conditional samples from a generator, decoded by its tokenizer"),
    "report": ("fvq.commands.report", "render a self-contained HTML report of a training run"),
    "repro": ("fvq.commands.repro", "the paper's claims at CPU scale: list, run and summarize the experiments"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; the subcommand ``command`` (if given) gets its full arguments."""
    from fvq.version import __version__

    parser = argparse.ArgumentParser(prog="fvq", description="Discrete image tokenizers with fully used codebooks.")
    parser.add_argument("--version", action="version", version=f"fvq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or help_text).strip()
        p = sub.add_parser(name, help=help_text, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args, extras = parser.parse_known_args(argv)
    # ``key=value`` overrides may stand anywhere after the command (argparse cannot interleave them with options)
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides or []) + [e for e in extras if "=" in e and not e.startswith("-")]
        extras = [e for e in extras if not ("=" in e and not e.startswith("-"))]
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        result = args._run(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"fvq {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
