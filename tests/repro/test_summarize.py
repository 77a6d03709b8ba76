"""Tables and verdicts from summaries, and the page when nothing has run yet."""

from __future__ import annotations

from fvq.repro.claims import CLAIMS
from fvq.repro.experiments import select
from fvq.repro.summarize import NOT_RUN, experiment_table, render_results, variant_means


def _summary(usage: float, psnr: float, seed: int, restarted: int | None = None) -> dict:
    metrics = {"usage": usage, "perplexity": 10.0, "dead_codes": 3, "restarted_codes": restarted, "psnr": psnr}
    run = {"experiment": "tiny", "variant": "vq_k64", "seed": seed}
    return {**run, "metrics": {**metrics, "lpips": 0.2}, "time": {"wall_s": 120.0}}


def test_table_gives_seed_means_with_ranges_and_marks_missing_runs(tiny_suite):
    variant = select(tiny_suite / "experiments", "tiny/vq_k64")[0]
    assert NOT_RUN in experiment_table([variant], {})
    runs = {"vq_k64": [_summary(0.5, 20.0, 0), _summary(0.7, 22.0, 1)]}
    table = experiment_table([variant], runs)
    assert "| tiny VQ | 64 | 16 | 2 / 1 | 60.0 % (50.0-70.0) |" in table and "21.00 (20.00-22.00)" in table
    assert "no restarts" in table
    assert variant_means(runs["vq_k64"])["usage"] == 0.6


def test_fig3_verdict_reads_the_means():
    fig3 = next(c for c in CLAIMS if c.key == "fig3")
    means = {name: {"usage": 0.5, "psnr": 20.0} for name in fig3.needs}
    for k in ("k4096", "k16384"):
        means[f"bridge_ann_{k}"]["usage"] = 0.99
        means[f"linear_{k}"]["usage"] = 0.9
    word, reason = fig3.verdict(means)
    assert word == "holds" and "usage bridge_ann_k4096 0.99 vs linear_ann_k4096 0.5" in reason
    means["linear_k16384"]["usage"] = 0.4  # annealing did not lower linear's usage at 16k
    assert fig3.verdict(means)[0] == "does not hold"


def test_baselines_verdict_compares_usage_with_the_classic_recipe_at_16k_and_65k():
    baselines = next(c for c in CLAIMS if c.key == "baselines")
    means = {name: {"usage": 0.5, "psnr": 20.0} for name in baselines.needs}
    means["fvq_k4096"]["psnr"] = 22.0
    means["fvq_k16384"]["usage"] = means["fvq_k65536"]["usage"] = 0.8
    word, reason = baselines.verdict(means)
    assert word == "holds" and "usage fvq_k65536 0.8 vs ema_kmeans_restarts_k65536 0.5" in reason
    means["ema_kmeans_restarts_k65536"]["usage"] = 0.9  # the classic recipe ahead at 65k
    assert baselines.verdict(means)[0] == "does not hold"


def test_table3_verdict_compares_codebook_sizes_code_widths_and_the_vqgan_recipe():
    table3 = next(c for c in CLAIMS if c.key == "table3")
    psnr = {"fvq_k1024_d256": 21, "fvq_k4096_d256": 23, "fvq_k16384_d256": 24, "fvq_k65536_d256": 25}
    psnr |= {"fvq_k4096_d8": 21.5, "fvq_k4096_d64": 22, "vq_k4096_d256": 20, "vq_k4096_d8_cosine": 22.5}
    means = {name: {"usage": 0.9, "psnr": float(psnr.get(name, 20.0))} for name in table3.needs}
    means["vq_k4096_d256"]["usage"] = 0.01
    word, reason = table3.verdict(means)
    assert word == "holds" and "psnr fvq_k4096_d64 22 vs fvq_k4096_d8 21.5" in reason
    means["fvq_k4096_d8"]["psnr"] = 22.5  # 8 channels reconstruct better than 64
    word, reason = table3.verdict(means)
    assert word == "does not hold" and "fvq_k4096_d64 22 vs fvq_k4096_d8 22.5 (against the claim)" in reason


def test_the_page_says_not_yet_run_without_results(tiny_suite):
    out = tiny_suite / "docs" / "results.md"
    written = render_results(tiny_suite / "experiments", tiny_suite / "results", out, tiny_suite / "figs")
    assert written == [out]
    page = out.read_text()
    assert "0 of 1 runs have results" in page and f"*Plot: {NOT_RUN}.*" not in page  # tiny is no claim's folder
    assert (
        "| [fig3](#fig3) | Fig. 3 and Observation 3 | `fig3_usage_curves` | no experiment files | not yet run |" in page
    )


def test_the_page_carries_an_experiments_findings(tiny_suite):
    out = tiny_suite / "docs" / "results.md"
    (tiny_suite / "experiments" / "tiny" / "findings.md").write_text("Seed 1 lost 7 of 16 group positions.\n")
    render_results(tiny_suite / "experiments", tiny_suite / "results", out, tiny_suite / "figs")
    page = out.read_text()
    assert "**What the runs show** (`experiments/tiny/findings.md`)." in page
    assert "Seed 1 lost 7 of 16 group positions." in page


def test_a_lead_of_the_means_that_some_seeds_reverse_holds_only_on_average():
    baselines = next(c for c in CLAIMS if c.key == "baselines")
    means = {name: {"usage": 0.5, "psnr": 20.0} for name in baselines.needs}
    means["fvq_k4096"]["psnr"] = 22.0
    means["fvq_k65536"]["usage"] = 0.8
    # four seeds each: the bridge leads on average (0.656 vs 0.465), but its seed 1 is below two classic seeds
    means["fvq_k16384"] = variant_means([_summary(u, 24.0, s) for s, u in enumerate((0.774, 0.414, 0.745, 0.693))])
    means["ema_kmeans_restarts_k16384"] = variant_means(
        [_summary(u, 24.0, s) for s, u in enumerate((0.436, 0.447, 0.517, 0.460))]
    )
    word, reason = baselines.verdict(means)
    assert word == "holds on average"
    assert "usage fvq_k16384 0.6565 vs ema_kmeans_restarts_k16384 0.465 (not in every seed: 0.414-0.774 vs " in reason
    means["fvq_k16384"]["usage_min"] = 0.6  # every seed of the bridge above every classic seed
    assert baselines.verdict(means)[0] == "holds"
