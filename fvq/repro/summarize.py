"""Tables and figures of the reproduction suite from the committed summaries: ``docs/results.md`` and
``docs/figures/results/*.png``.

Everything written here is a function of ``experiments/`` and ``results/``: a variant without a summary reads
"not yet run", and no figure is drawn for an experiment without one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fvq.repro.claims import CLAIMS, Claim
from fvq.repro.experiments import Variant, codebook_of, discover
from fvq.repro.results import ResultIndex, planned_runs

NOT_RUN = "not yet run"
_PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974")
MEAN_METRICS = ("usage", "perplexity", "dead_codes", "restarted_codes", "psnr", "lpips")


def variant_means(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each protocol metric over the seeds that ran, and its range as ``<metric>_min`` / ``<metric>_max``
    (``None`` values, e.g. no restarts, left out)."""
    means = {}
    for key in MEAN_METRICS:
        values = [v for v in (r["metrics"].get(key) for r in runs) if v is not None]
        if values:
            means[key] = float(np.mean(values))
            means[f"{key}_min"], means[f"{key}_max"] = float(min(values)), float(max(values))
    return means


def _fmt(values: list[float | None], spec: str, percent: bool = False) -> str:
    kept = [v for v in values if v is not None]
    if not kept:
        return "-"
    scale = 100.0 if percent else 1.0
    unit = " %" if percent else ""
    mean = float(np.mean(kept)) * scale
    if len(kept) == 1:
        return f"{format(mean, spec)}{unit}"
    lo, hi = min(kept) * scale, max(kept) * scale
    return f"{format(mean, spec)}{unit} ({format(lo, spec)}-{format(hi, spec)})"


def _describe_quantizer(variant: Variant) -> tuple[str, str]:
    config = variant.config_dict(variant.seeds[0])
    q = codebook_of(config["quantizer"])
    return f"{int(q.get('codebook_size', 0)):,}", str(q.get("codebook_dim", "-"))


@dataclass
class ExperimentReport:
    """The rendered parts of one experiment."""

    table: str
    figures: list[Path] = field(default_factory=list)
    machines: list[str] = field(default_factory=list)
    done: int = 0
    planned: int = 0
    means: dict[str, dict[str, float]] = field(default_factory=dict)


def experiment_table(variants: list[Variant], runs: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table: one row per variant, held-out figures as mean (min-max) over the seeds that ran; a row whose
    runs are filed under another experiment is marked and the experiment named below the table."""
    head = (
        "| variant | K | D | seeds run | held-out usage | perplexity | dead codes | restarted codes | PSNR (dB) | "
        "LPIPS | wall min / run | paper |"
    )
    lines = [head, "|" + "---|" * 12]
    shared: list[str] = []
    for v in variants:
        k, d = _describe_quantizer(v)
        done = runs.get(v.name, [])
        seeds = f"{len(done)} / {len(v.seeds)}"
        if not done:
            cells = [NOT_RUN] + ["-"] * 6
        else:
            m = [r["metrics"] for r in done]
            cells = [
                _fmt([x["usage"] for x in m], ".1f", percent=True),
                _fmt([x["perplexity"] for x in m], ".0f"),
                _fmt([x["dead_codes"] for x in m], ".0f"),
                _fmt([x["restarted_codes"] for x in m], ".0f")
                if any(x["restarted_codes"] is not None for x in m)
                else "no restarts",
                _fmt([x["psnr"] for x in m], ".2f"),
                _fmt([x["lpips"] for x in m], ".3f"),
                _fmt([r["time"]["wall_s"] / 60 for r in done], ".1f"),
            ]
        homes = sorted({f"{r['experiment']}/{r['variant']}" for r in done} - {v.id})
        if homes:
            seeds += " †"
            shared.append(f"{v.label}: {', '.join(f'`{h}`' for h in homes)}")
        lines.append(f"| {v.label} | {k} | {d} | {seeds} | " + " | ".join(cells) + f" | {v.paper or '-'} |")
    if shared:
        lines += [
            "",
            "† Runs filed under another experiment (the same config, seed and protocol; trained once): "
            + "; ".join(shared)
            + ".",
        ]
    return "\n".join(lines)


def _mean_curve(runs: list[dict[str, Any]], section: str, x: str, y: str) -> tuple[np.ndarray, np.ndarray] | None:
    curves = []
    for r in runs:
        data = r["curves"].get(section, {})
        if x in data and y in data and data[x]:
            pairs = [(a, b) for a, b in zip(data[x], data[y]) if a is not None and b is not None]
            if pairs:
                curves.append(np.asarray(pairs, dtype=float))
    if not curves:
        return None
    n = min(len(c) for c in curves)
    stack = np.stack([c[:n] for c in curves])  # (seeds, n, 2); seeds of one variant share their x values
    return stack[0, :, 0], stack[:, :, 1].mean(axis=0)


def _style(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def experiment_figure(name: str, variants: list[Variant], runs: dict[str, list[dict[str, Any]]]) -> Figure | None:
    """Held-out usage over training (left) and against held-out tokens per code counted (right), seed means."""
    ran = [v for v in variants if runs.get(v.name)]
    if not ran:
        return None
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax_train, ax_tokens = fig.subplots(1, 2)
    for i, v in enumerate(ran):
        color = _PALETTE[i % len(_PALETTE)]
        style = "--" if "noann" in v.name or v.name.startswith(("linear_k", "mlp5_k", "bridge_k")) else "-"
        curve = _mean_curve(runs[v.name], "validation", "step", "val/usage")
        if curve is not None:
            ax_train.plot(*curve, style, color=color, marker="o", markersize=3, label=v.label)
        curve = _mean_curve(runs[v.name], "usage_vs_tokens", "tokens_per_code", "usage")
        if curve is not None:
            ax_tokens.plot(*curve, style, color=color, label=v.label)
    _style(ax_train, f"{name}: held-out usage during training", "step", "usage")
    _style(ax_tokens, "usage against held-out tokens counted (final model)", "tokens per code", "usage")
    ax_tokens.set_xscale("log")
    for ax in (ax_train, ax_tokens):
        ax.set_ylim(0, 1.02)
    ax_tokens.legend(frameon=False, fontsize=7, loc="upper left")
    return fig


def report_experiment(
    name: str, variants: list[Variant], runs: dict[str, list[dict[str, Any]]], figures_dir: Path
) -> ExperimentReport:
    from fvq.plots import figure_png

    report = ExperimentReport(table=experiment_table(variants, runs))
    report.planned = sum(len(v.seeds) for v in variants)
    report.done = sum(len(runs.get(v.name, [])) for v in variants)
    report.means = {v: variant_means(r) for v, r in runs.items() if r}
    machines = {
        f"{r['machine']['cpu_model']} ({r['machine']['cpus']} CPUs; {', '.join(r['machine']['cpu_flags'])}), "
        f"torch {r['machine']['torch']}"
        for rs in runs.values()
        for r in rs
    }
    report.machines = sorted(machines)
    fig = experiment_figure(name, variants, runs)
    if fig is not None:
        path = figures_dir / f"{name}.png"
        figure_png(fig, path)
        report.figures.append(path)
    return report


def _verdict(claim: Claim, report: ExperimentReport | None) -> str:
    if report is None or report.done == 0:
        return NOT_RUN
    if claim.verdict is None:
        return "no single verdict: read the table"
    missing = [v for v in claim.needs if v not in report.means]
    if missing:
        return f"incomplete: no results yet for {', '.join(missing)}"
    word, reason = claim.verdict(report.means)
    return f"**{word} at CPU scale** ({reason})"


def _budget_line(variants: list[Variant]) -> str:
    runs = planned_runs(variants)
    named = sum(len(v.seeds) for v in variants)
    hours = math.fsum(r.cpu_hours for r in runs)
    shared = f" ({named - len(runs)} more named but shared)" if named > len(runs) else ""
    return f"{len(runs)} runs{shared}, planned {hours:.1f} CPU-hours (wall minutes x 2 cores, training + evaluation)"


FINDINGS_FILE = "findings.md"


def _findings(experiments_dir: str | Path, name: str) -> list[str]:
    """The experiment's ``findings.md`` (what its runs show, in words, written by whoever read them) as page lines,
    or none."""
    path = Path(experiments_dir) / name / FINDINGS_FILE
    if not path.is_file():
        return []
    return ["", f"**What the runs show** (`experiments/{name}/{FINDINGS_FILE}`).", "", path.read_text().strip()]


def render_results(
    experiments_dir: str | Path = "experiments",
    results_dir: str | Path = "results",
    output: str | Path = "docs/results.md",
    figures_dir: str | Path = "docs/figures/results",
) -> list[Path]:
    """Write ``output`` and its figures from the experiment files and the summaries; returns the written paths."""
    suite = discover(experiments_dir)
    index = ResultIndex(results_dir)
    output, figures_dir = Path(output), Path(figures_dir)
    written: list[Path] = []
    reports = {}
    for name, variants in suite.items():
        runs = {v.name: [r.summary for r in index.runs_of(v)] for v in variants}
        reports[name] = report_experiment(name, variants, {k: r for k, r in runs.items() if r}, figures_dir)
    for r in reports.values():
        written += r.figures
    all_variants = [v for vs in suite.values() for v in vs]
    distinct = planned_runs(all_variants)
    done = index.finished(distinct)
    planned = len(distinct)

    md = [
        "# The paper's claims at CPU scale",
        "",
        "<!-- Generated by `fvq repro summarize` from experiments/ and results/; edit those, not this file. -->",
        "",
        "Each claim of *Scalable Training for Vector-Quantized Networks with 100% Codebook Utilization* (FVQ) that "
        "a CPU can test is an experiment folder under `experiments/`: one YAML file per variant (a base config, "
        "overrides, seeds, a time budget). `fvq repro run EXPERIMENT` trains each run resumably and evaluates it with "
        "one protocol; the summary of every finished run is committed under `results/<experiment>/<run>.json` "
        "(metrics, curves as data, the command, machine, wall and CPU time), and this page is rebuilt from those "
        "files by `fvq repro summarize`. A run that several experiments name (the same config, seed and protocol, "
        "e.g. the paper's recipe at K = 16,384 in Fig. 3, Table 3, Fig. 6 and the baselines) is trained once and "
        "read by all of them (marked †).",
        "",
        "**Scale.** The tiny f4 autoencoder of `experiments/base.yaml` (32 base channels, 0.89 M parameters; "
        "`tiny_var_f4`, VAR's latent layout, for the "
        "multi-scale runs) on 32 px crops of the photos embedded in scikit-image, held-out crops from photos "
        "training never sees; hundreds of steps at batch 32 instead of 40 ImageNet epochs; no LPIPS or GAN loss in "
        "training. A claim that holds here is evidence of the mechanism, not of the paper's numbers; one that does "
        "not may need the paper's scale. Budgets are wall minutes per seed on a 2-core CPU, estimated from short "
        "step-time probes on a shared 2-core AMD EPYC; each summary records the time the run really took.",
        "",
        "**Protocol** (`fvq/repro/protocol.py`). Held-out codebook usage over the whole held-out set with at least "
        "64 tokens per code (the runner refuses a smaller set before training), the curve of usage against the "
        "number of held-out tokens counted, perplexity, dead codes, codes overwritten by dead-code restarts "
        "(restarts keep usage high by construction), PSNR (8-bit RGB) and LPIPS (AlexNet, the paper's) on the first "
        "1,024 held-out crops, wall and CPU time. Figures are means over the seeds that ran, with (min-max). A "
        "verdict compares means: *holds* when every seed of the leading side is also beyond every seed of the other, "
        "*holds on average* when the means agree with the claim but the seeds' ranges overlap, *does not hold* "
        "otherwise.",
        "",
        f"**Progress.** {done} of {planned} runs have results; the suite is {_budget_line(all_variants)}.",
        "",
        "| claim | paper | experiment | runs with results | verdict |",
        "|---|---|---|---|---|",
    ]
    for claim in CLAIMS:
        r = reports.get(claim.experiment)
        runs = f"{r.done} / {r.planned}" if r else "no experiment files"
        md.append(
            f"| [{claim.key}](#{claim.key}) | {claim.source} | `{claim.experiment}` | {runs} | "
            f"{_verdict(claim, r).replace('|', '/')} |"
        )
    for claim in CLAIMS:
        r = reports.get(claim.experiment)
        variants = suite.get(claim.experiment, [])
        md += [
            "",
            f'## {claim.source}: {claim.experiment} <a id="{claim.key}"></a>',
            "",
            f"**Claim.** {claim.statement}",
            "",
        ]
        if r is None:
            md += ["No experiment files yet.", ""]
            continue
        md += [
            f"**Command.** `fvq repro run {claim.experiment}` ({_budget_line(variants)}); one run: "
            f"`fvq repro run {claim.experiment}/<variant> --seed S`.",
            "",
            f"**Machine.** {'; '.join(r.machines) if r.machines else NOT_RUN}.",
            "",
            r.table,
            "",
        ]
        if r.figures:
            for path in r.figures:
                rel = path.relative_to(output.parent) if path.is_relative_to(output.parent) else path
                md.append(f"![{claim.experiment}]({rel.as_posix()})")
        else:
            md.append(f"*Plot: {NOT_RUN}.*")
        md += ["", f"**Verdict.** {_verdict(claim, r)}", *_findings(experiments_dir, claim.experiment)]
    others = sorted(set(suite) - {c.experiment for c in CLAIMS})
    for name in others:
        r = reports[name]
        md += ["", f"## {name}", "", r.table, ""]
        md += [
            f"![{name}]({p.relative_to(output.parent).as_posix()})"
            for p in r.figures
            if p.is_relative_to(output.parent)
        ]
        md += _findings(experiments_dir, name)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(md) + "\n")
    written.append(output)
    return written


def suite_budget(variants: list[Variant]) -> float:
    """Planned CPU hours of ``variants`` (all seeds), each distinct run counted once."""
    return math.fsum(r.cpu_hours for r in planned_runs(variants))
