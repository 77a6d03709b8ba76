"""The ``fvq`` command. Each subcommand lives in ``fvq/commands/<name>.py`` with ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "toy": ("fvq.commands.toy", "the paper's toy experiment (Figure 2): STE vs linear projector vs VQBridge"),
    "bench": ("fvq.commands.bench", "benchmarks: nearest-code search, quantizers"),
    "train": ("fvq.commands.train", "train a tokenizer from a YAML config (CPU, or many GPUs under torchrun)"),
}


def build_parser() -> argparse.ArgumentParser:
    from fvq import __version__

    parser = argparse.ArgumentParser(prog="fvq", description="Discrete image tokenizers with fully used codebooks.")
    parser.add_argument("--version", action="version", version=f"fvq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().splitlines()[0])
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
