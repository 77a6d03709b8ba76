"""Render a training run as one self-contained HTML page: ``fvq report RUN [--out FILE.html]``.

The page shows the loss and learning-rate curves, codebook usage and perplexity over training (per batch and on the
held-out set), the rank-ordered held-out code-frequency histogram with the dead codes marked, the reconstruction
grid, the latest validation metrics (and ``fvq eval``'s metrics with their protocol notes when present) and the
run's config. Every figure is embedded in the HTML (base64), so the file can be mailed on its own; the same figures
are also written as PNG files next to it. By default the report goes to ``RUN/report/index.html``.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory written by fvq train (the --out of fvq train)")
    parser.add_argument("--out", metavar="FILE.html", help="HTML file to write (default: RUN/report/index.html)")


def run(args: argparse.Namespace) -> int:
    from fvq.report import build_report

    path = build_report(args.run, args.out)
    print(f"report: {path}")
    for png in sorted(path.parent.glob("*.png")):
        print(f"  figure: {png}")
    return 0
