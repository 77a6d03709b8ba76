"""Class-conditional samples: ``fvq sample GENERATOR --tokenizer MODEL --out DIR --num-samples N``.

GENERATOR is a generator export (``RUN/model``), a generator run folder (its export, else its newest checkpoint) or a
checkpoint; MODEL is the tokenizer whose tokens trained it (exported folder, run folder or checkpoint). The
generator records that tokenizer's identity: another tokenizer is refused (``--force`` samples anyway; a codebook
of another size never works).

Classes: ``--num-samples N`` draws them uniformly (from ``--seed``), ``--classes 1,2,3`` names them (one sample
each), ``--per-class N`` takes N of every class (or of each of ``--classes``); 50 per class of 1,000 classes is the
50,000 of the FID protocol. Sample ``i`` of class ``c`` is written to ``DIR/images/{i:06d}_c{c}.png``; then
``DIR/labels.json``, ``DIR/samples.npz`` with ``--npz`` (ADM layout: ``arr_0`` uint8 N x H x W x 3, ``labels``;
what ``fvq eval-gen`` reads) and ``DIR/sample_config.json`` (every setting, both identities, class balance).

Each sample's randomness comes from (seed, sample index), and each image is decoded on its own: the images do not
depend on ``--batch-size``, on the number of processes, or on where a run was resumed. Run the same command again
to continue an interrupted run (written samples are checked and kept); a folder holding samples of other settings
is refused. Under ``torchrun --nproc_per_node N -m fvq sample ...`` every process takes its share of the samples.
"""

from __future__ import annotations

import argparse
import sys

from fvq.generation.sampling import CFG_SCHEDULES


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class ids like 1,2,3, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one class id")
    return values


def _interval(text: str) -> tuple[float, float]:
    try:
        start, end = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,END fractions like 0,0.5, got {text!r}") from None
    return start, end


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("generator", metavar="GENERATOR", help="generator export, generator run folder or checkpoint")
    parser.add_argument(
        "--tokenizer", required=True, metavar="MODEL", help="the tokenizer the generator was trained on"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (resumed when it holds this run)")
    classes = parser.add_argument_group("classes (one of --num-samples, --classes, --per-class)")
    classes.add_argument(
        "--num-samples", type=int, default=None, metavar="N", help="N samples, classes drawn uniformly"
    )
    classes.add_argument("--classes", type=_int_list, default=None, metavar="C1,C2,...", help="these class ids")
    classes.add_argument("--per-class", type=int, default=None, metavar="N", help="N samples of every (listed) class")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--cfg-scale", metavar="S", type=float, default=1.0, help="classifier-free guidance scale (1: none)"
    )
    sampling.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default="constant", help="guidance over tokens")
    sampling.add_argument(
        "--cfg-interval",
        type=_interval,
        default=(0.0, 1.0),
        metavar="A,B",
        help="fractions of the tokens guided by --cfg-schedule interval (default 0,1)",
    )
    sampling.add_argument("--temperature", metavar="T", type=float, default=1.0, help="softmax temperature (0: greedy)")
    sampling.add_argument("--top-k", metavar="K", type=int, default=0, help="keep the k most likely tokens (0: all)")
    sampling.add_argument("--top-p", metavar="P", type=float, default=1.0, help="nucleus threshold (1: off)")
    sampling.add_argument("--seed", metavar="SEED", type=int, default=0, help="seed of the run (classes and tokens)")
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", metavar="B", type=int, default=32, help="samples per generator call (default 32)")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to compute")
    run.add_argument("--npz", action="store_true", help="also pack DIR/samples.npz (ADM layout)")
    run.add_argument("--no-png", action="store_true", help="keep only the .npz (needs --npz)")
    run.add_argument("--force", action="store_true", help="sample with a tokenizer the generator does not record")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from fvq.distributed import cleanup_distributed, init_distributed
    from fvq.inference.generate import (
        ForeignGeneratorError,
        SamplingOptions,
        load_generator,
        plan_classes,
        sample_to_folder,
    )
    from fvq.inference.loading import load_model

    if args.num_samples is not None and (args.classes is not None or args.per_class is not None):
        raise ValueError("give --num-samples (classes drawn uniformly) or --classes / --per-class, not both")
    if args.num_samples is None and args.classes is None and args.per_class is None:
        raise ValueError("choose the classes: --num-samples N, --classes 1,2,3 or --per-class N")
    if args.no_png and not args.npz:
        raise ValueError("--no-png needs --npz: nothing would be kept")
    options = SamplingOptions(
        cfg_scale=args.cfg_scale,
        cfg_schedule=args.cfg_schedule,
        cfg_interval=args.cfg_interval,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    ctx = init_distributed(args.device)
    try:
        generator = load_generator(args.generator, device=ctx.device)
        tokenizer = load_model(args.tokenizer, device=ctx.device)
        plan = plan_classes(
            generator.config.num_classes,
            num_samples=args.num_samples,
            class_ids=args.classes,
            per_class=args.per_class,
            seed=args.seed,
        )
        try:
            report = sample_to_folder(
                generator,
                tokenizer,
                args.out,
                plan,
                options,
                batch_size=args.batch_size,
                write_npz=args.npz,
                keep_png=not args.no_png,
                force=args.force,
                progress=not args.no_progress,
            )
        except ForeignGeneratorError as error:
            raise ValueError(f"{error} (here: --force)") from error
        if ctx.is_main:
            h, w = report.image_size
            print(
                f"{report.num_samples} samples of {h}x{w} in {report.out_dir} ({report.generated} generated, "
                f"{report.reused} already there; {report.seconds:.1f} s, {ctx.world_size} process(es))",
                file=sys.stdout,
            )
            for path in (report.images_dir, report.npz, report.labels, report.config):
                if path is not None:
                    print(f"  {path}")
    finally:
        cleanup_distributed()
    return 0
