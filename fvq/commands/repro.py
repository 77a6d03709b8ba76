"""The reproduction suite: ``fvq repro list | run EXPERIMENT[/VARIANT] [--seed S] | summarize``.

Experiments are folders of YAML files under ``experiments/`` (one per variant: a base config, overrides, seeds, a
time budget). ``run`` trains each run in ``runs/repro/<experiment>/<variant>_seed<S>/`` (resumable: run it again
after an interruption) and writes ``results/<experiment>/<variant>_seed<S>.json``; a run with a summary is skipped
unless ``--force``, and a run another experiment has finished (same config, seed and protocol) is not trained
again. ``list`` shows every variant, its budget, which seeds have results, and the suite's planned
CPU time. ``summarize`` rebuilds ``docs/results.md`` and ``docs/figures/results/`` from ``results/``.
Run from the repository root (or pass the folders).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "run", "summarize"), help="what to do")
    parser.add_argument("experiment", nargs="?", help="run: EXPERIMENT (every variant) or EXPERIMENT/VARIANT")
    parser.add_argument("overrides", nargs="*", help="run: extra key=value config overrides (recorded)")
    parser.add_argument("--seed", type=int, action="append", help="run: only this seed (repeatable; default: all)")
    parser.add_argument("--experiments", default="experiments", help="experiments folder (default: experiments)")
    parser.add_argument("--results", default="results", help="summaries folder (default: results)")
    parser.add_argument("--runs", default="runs/repro", help="run folders (default: runs/repro)")
    parser.add_argument("--docs", default="docs/results.md", help="summarize: the page written")
    parser.add_argument("--figures", default="docs/figures/results", help="summarize: the figures folder")
    parser.add_argument(
        "--stop-after",
        type=int,
        metavar="STEPS",
        help="run: stop after this many optimizer steps of this invocation (continue by running it again)",
    )
    parser.add_argument("--force", action="store_true", help="run: evaluate again and rewrite existing summaries")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="run: device (cpu)")


def _list(args: argparse.Namespace) -> int:
    from fvq.repro.experiments import discover
    from fvq.repro.results import ResultIndex, planned_runs
    from fvq.repro.summarize import suite_budget

    suite = discover(args.experiments)
    index = ResultIndex(args.results)
    every = [v for vs in suite.values() for v in vs]
    print(f"{'variant':48s} {'seeds':>9s} {'train':>7s} {'eval':>6s} {'CPU-h':>6s}  results")
    for name, variants in suite.items():
        print(f"{name}/  ({suite_budget(variants):.1f} CPU-h)")
        for v in variants:
            found = {s: index.find(v, s) for s in v.seeds}
            done = [s for s, r in found.items() if r is not None]
            shared = sorted({r.home for r in found.values() if r is not None and r.home != v.id})
            mark = f"{len(done)}/{len(v.seeds)}" + (f" (seeds {', '.join(map(str, done))})" if done else "")
            mark += f" shared with {', '.join(shared)}" if shared else ""
            print(
                f"  {v.name:46s} {len(v.seeds):>9d} {v.budget.train_minutes:>5.1f}mn {v.budget.eval_minutes:>4.1f}mn "
                f"{v.budget.cpu_hours(len(v.seeds)):>6.2f}  {mark}"
            )
    runs = planned_runs(every)
    named = sum(len(v.seeds) for v in every)
    done = index.finished(runs)
    hours = suite_budget(every)
    print(
        f"total: {len(suite)} experiments, {len(every)} variants, {len(runs)} distinct runs ({named} named: "
        f"experiments share a run with the same config, seed and protocol), {done} with results, planned "
        f"{hours:.1f} CPU-hours ({hours / 2:.1f} hours of wall time on 2 cores; budgets are wall minutes per seed "
        "on a 2-core CPU)"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    from fvq.repro.experiments import select
    from fvq.repro.runner import run_variant

    if not args.experiment:
        raise ValueError("usage: fvq repro run EXPERIMENT[/VARIANT] [--seed S] (see fvq repro list)")
    variants = select(args.experiments, args.experiment)
    for v in variants:
        for seed in args.seed or v.seeds:
            outcome = run_variant(
                v,
                seed,
                runs_dir=args.runs,
                results_dir=args.results,
                stop_after=args.stop_after,
                overrides=args.overrides,
                force=args.force,
                device=args.device,
            )
            where = outcome.summary_path or outcome.run_dir
            print(f"{v.id} seed {seed}: {outcome.status} at step {outcome.steps}/{outcome.total_steps} -> {where}")
            if outcome.status == "partial":
                print("  stopped before the last step: run the same command again to continue")
            elif outcome.status == "shared":
                print("  another experiment finished the same run (config, seed and protocol): its summary serves")
    return 0


def _summarize(args: argparse.Namespace) -> int:
    from fvq.repro.summarize import render_results

    for path in render_results(args.experiments, args.results, args.docs, args.figures):
        print(f"wrote {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action != "run" and (args.experiment or args.overrides):
        raise ValueError(f"fvq repro {args.action} takes no experiment or overrides")
    return {"list": _list, "run": _run, "summarize": _summarize}[args.action](args)
