"""Benchmarks: ``fvq bench search`` (exact nearest-code search) and ``fvq bench quantizers`` (quantizer families)."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Each module defines ``add_arguments(parser)`` and ``run(args) -> int`` and is
# imported only when its benchmark runs, so ``fvq --help`` stays fast and a missing module only affects its own
# subcommand. A new benchmark is one more entry here.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "search": (
        "fvq.bench.search",
        "exact nearest-code search vs the sgemm peak; VectorQuantizer forward + backward at large codebooks",
    ),
    "quantizers": ("fvq.bench.quantizers", "forward + backward time and peak memory of every quantizer family"),
    "generator": ("fvq.bench.generator", "GPT training tokens/s and model-FLOP utilisation vs the sgemm peak"),
    "sampling": ("fvq.bench.sampling", "GPT sampling tokens/s with CFG, KV cache vs full recomputation"),
    "step": ("fvq.bench.step", "profile of one tokenizer training step and one validation, by part"),
    "gpu": ("fvq.bench.gpu", "one timed run on a CUDA machine: tokenizer and GPT training, search, sampling"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "benchmarks:\n" + "\n".join(f"  {name:<12} {text}" for name, (_, text) in BENCHMARKS.items())
    parser.epilog += "\n\n'fvq bench NAME --help' lists the options of one benchmark."
    parser.add_argument("benchmark", nargs="?", choices=list(BENCHMARKS), metavar="BENCHMARK", help="which benchmark")
    # The benchmark's own options are parsed by its module at run time, after it is imported.
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...", help="options of the benchmark")


def _load(name: str):
    module_name, _ = BENCHMARKS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not module_name.startswith(err.name):
            raise  # the benchmark exists but one of its own imports is missing
        return None, f"the {name!r} benchmark is not available in this installation (no module {module_name})"
    missing = [attr for attr in ("add_arguments", "run") if not callable(getattr(module, attr, None))]
    if missing:
        return None, f"the {name!r} benchmark module {module_name} does not define {' and '.join(missing)}"
    return module, ""


def run(args: argparse.Namespace) -> int:
    name = getattr(args, "benchmark", None)
    if name is None:
        print(f"usage: fvq bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        for key, (_, help_text) in BENCHMARKS.items():
            print(f"  {key:<12} {help_text}", file=sys.stderr)
        print("'fvq bench NAME --help' lists the options of one benchmark.", file=sys.stderr)
        return 2
    module, problem = _load(name)
    if module is None:
        print(f"fvq bench {name}: {problem}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"fvq bench {name}", description=BENCHMARKS[name][1])
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.bench_args)) or 0)
