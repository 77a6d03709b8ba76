"""The paper's toy experiment (FVQ Figure 2): plain STE VQ vs linear projector vs VQBridge on a fixed target set.

Examples::

    fvq toy --out runs/toy                      # the documented run (about a minute on a 2-core CPU)
    fvq toy --out runs/toy --dim 16             # targets in R^16, 2-D views by PCA
    fvq toy --out runs/toy --no-annealing       # constant LR instead of learning annealing
    fvq toy --out runs/toy --methods vq vqbridge --steps 500 --codebook-size 256

Writes ``results.json`` (config, final metrics, curves, trajectories) and ``trajectories.png``, ``usage.png``,
``codes.png`` to ``--out`` and prints a table of the final metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fvq.toy import METHODS, ToyConfig, format_table, run_toy, save_figures

_DEFAULTS = ToyConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="SGD steps per method")
    parser.add_argument("--codebook-size", type=int, default=_DEFAULTS.codebook_size, help="K")
    parser.add_argument("--dim", type=int, default=_DEFAULTS.dim, help="dimension of targets and codes")
    parser.add_argument("--num-targets", type=int, default=_DEFAULTS.num_targets, help="size N of the target set")
    parser.add_argument("--num-modes", type=int, default=_DEFAULTS.num_modes, help="Gaussian modes on the ring")
    parser.add_argument("--mode-std", type=float, default=_DEFAULTS.mode_std, help="std of each mode")
    parser.add_argument(
        "--latent-init-std", type=float, default=_DEFAULTS.latent_init_std, help="std of the initial z_e"
    )
    parser.add_argument(
        "--lr", type=float, default=_DEFAULTS.lr, help="peak SGD LR of the quantizer (latents: lr * num_targets)"
    )
    parser.add_argument("--no-annealing", action="store_true", help="constant LR instead of learning annealing")
    parser.add_argument("--commitment-weight", type=float, default=_DEFAULTS.commitment_weight, help="beta")
    parser.add_argument(
        "--init-scale", type=float, default=None, help="raw codebook init scale (default 1/K, the published init)"
    )
    parser.add_argument("--bridge-hidden-dim", type=int, default=_DEFAULTS.bridge_hidden_dim)
    parser.add_argument("--bridge-depth", type=int, default=_DEFAULTS.bridge_depth)
    parser.add_argument("--bridge-heads", type=int, default=_DEFAULTS.bridge_heads)
    parser.add_argument(
        "--bridge-group-size", type=int, default=None, help="codes per VQBridge token (default: 16 if it divides K)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run")
    parser.add_argument("--log-every", type=int, default=_DEFAULTS.log_every, help="curve resolution in steps")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1 by default: the toy's tensors are tiny, extra threads only add overhead)",
    )
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> ToyConfig:
    """The :class:`~fvq.toy.ToyConfig` described by parsed command-line arguments."""
    return ToyConfig(
        steps=args.steps,
        codebook_size=args.codebook_size,
        dim=args.dim,
        num_targets=args.num_targets,
        num_modes=args.num_modes,
        mode_std=args.mode_std,
        latent_init_std=args.latent_init_std,
        lr=args.lr,
        annealing=not args.no_annealing,
        commitment_weight=args.commitment_weight,
        init_scale=args.init_scale,
        bridge_hidden_dim=args.bridge_hidden_dim,
        bridge_depth=args.bridge_depth,
        bridge_heads=args.bridge_heads,
        bridge_group_size=args.bridge_group_size,
        methods=tuple(args.methods),
        log_every=args.log_every,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    result = run_toy(config, progress=not args.no_progress)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_table(result))
    written = [str(out / "results.json")]
    if not args.no_figures:
        written += save_figures(result, out)
    print("wrote " + ", ".join(written))
    return 0
