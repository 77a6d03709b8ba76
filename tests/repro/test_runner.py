"""A real tiny run through ``fvq repro``: interrupted, resumed, evaluated, summarized."""

from __future__ import annotations

import json

import pytest

from fvq.cli import main
from fvq.repro.experiments import select
from fvq.repro.results import planned_runs, variant_run_key
from fvq.repro.runner import run_variant, summary_path

PROTOCOL_FIELDS = {
    "usage",
    "perplexity",
    "dead_codes",
    "distinct_codes",
    "restarted_codes",
    "tokens",
    "tokens_per_code",
    "psnr",
    "psnr_y",
    "lpips",
    "eval_seconds",
}


def test_interrupted_run_resumes_then_writes_its_summary(tiny_suite, monkeypatch, capsys):
    monkeypatch.chdir(tiny_suite)
    variant = select("experiments", "tiny/vq_k64")[0]

    # 1. Interrupted after 2 of 3 steps: a checkpoint, no summary.
    first = run_variant(variant, 0, runs_dir="runs", results_dir="results", stop_after=2)
    assert (first.status, first.steps, first.total_steps, first.summary_path) == ("partial", 2, 3, None)
    assert not summary_path("results", variant, 0).exists()

    # 2. The same command again continues at step 2 (one more step), evaluates, and writes the summary.
    assert main(["repro", "run", "tiny/vq_k64", "--seed", "0", "--runs", "runs"]) == 0
    assert "finished at step 3/3" in capsys.readouterr().out
    summary = json.loads(summary_path("results", variant, 0).read_text())
    invocations = summary["time"]["invocations"]
    assert [(t["phase"], t.get("from_step"), t.get("to_step")) for t in invocations] == [
        ("train", 0, 2),
        ("train", 2, 3),
        ("eval", None, None),
    ]
    assert PROTOCOL_FIELDS <= set(summary["metrics"]) and summary["metrics"]["tokens"] == 8 * 64
    assert summary["steps"] == 3 and summary["command"] == "fvq repro run tiny/vq_k64 --seed 0"
    assert summary["curves"]["validation"]["step"] == [3.0] and summary["curves"]["train"]["step"] == [1.0, 2.0, 3.0]
    assert summary["curves"]["usage_vs_tokens"]["tokens"][-1] == 512
    assert summary["machine"]["cpu_model"] and summary["machine"]["torch"]
    assert summary["time"]["wall_s"] > 0 and summary["time"]["cpu_s"] > 0
    assert summary["config"]["seed"] == 0 and summary["protocol"]["min_tokens_per_code"] == 8

    # 3. A finished run is not trained again; list and summarize read the result.
    assert run_variant(variant, 0, runs_dir="runs", results_dir="results").status == "skipped"
    assert main(["repro", "list"]) == 0
    listing = capsys.readouterr().out
    assert "1/1 (seeds 0)" in listing and "planned 0.1 CPU-hours" in listing
    assert main(["repro", "summarize"]) == 0
    page = (tiny_suite / "docs" / "results.md").read_text()
    assert "| tiny VQ | 64 | 16 | 1 / 1 |" in page and "![tiny](figures/results/tiny.png)" in page
    assert (tiny_suite / "docs" / "figures" / "results" / "tiny.png").stat().st_size > 0


def test_a_held_out_set_too_small_is_refused_before_training(tiny_suite, monkeypatch):
    monkeypatch.chdir(tiny_suite)
    path = tiny_suite / "experiments" / "tiny" / "vq_k64.yaml"
    path.write_text(path.read_text().replace("min_tokens_per_code: 8", "min_tokens_per_code: 64"))
    variant = select("experiments", "tiny/vq_k64")[0]
    with pytest.raises(ValueError, match="held-out set is too small for K = 64"):
        run_variant(variant, 0, runs_dir="runs", results_dir="results")
    assert not (tiny_suite / "runs").exists()


def test_a_run_named_by_two_experiments_is_trained_once_and_read_by_both(tiny_suite, monkeypatch, capsys):
    monkeypatch.chdir(tiny_suite)
    text = (tiny_suite / "experiments" / "tiny" / "vq_k64.yaml").read_text()
    other = tiny_suite / "experiments" / "other"
    other.mkdir()
    # the same run under another name and label, and one that differs in one override
    (other / "same_run.yaml").write_text(text.replace("label: tiny VQ", "label: same run"))
    (other / "longer.yaml").write_text(text.replace("max_steps: 3", "max_steps: 4").replace("tiny VQ", "longer"))
    home, same, longer = (select("experiments", n)[0] for n in ("tiny/vq_k64", "other/same_run", "other/longer"))
    assert variant_run_key(home, 0) == variant_run_key(same, 0) != variant_run_key(longer, 0)
    assert variant_run_key(home, 0) != variant_run_key(home, 1)  # the seed is part of the run
    assert [len(r.variants) for r in planned_runs([home, same, longer])] == [2, 1]

    assert run_variant(home, 0, runs_dir="runs", results_dir="results").status == "finished"
    shared = run_variant(same, 0, runs_dir="runs", results_dir="results")
    assert (shared.status, shared.summary_path, shared.steps) == ("shared", summary_path("results", home, 0), 3)
    assert shared.run_dir.as_posix() == "runs/tiny/vq_k64_seed0"
    assert not (tiny_suite / "runs" / "other").exists() and not (tiny_suite / "results" / "other").exists()
    with pytest.raises(ValueError, match="fvq repro run tiny/vq_k64 --seed 0 --force"):
        run_variant(same, 0, runs_dir="runs", results_dir="results", force=True)

    # list and the page count the shared run once and say where it is filed
    assert main(["repro", "list"]) == 0
    listing = capsys.readouterr().out
    assert "1/1 (seeds 0) shared with tiny/vq_k64" in listing
    assert "2 distinct runs (3 named" in listing and "1 with results" in listing
    assert main(["repro", "summarize"]) == 0
    page = (tiny_suite / "docs" / "results.md").read_text()
    assert "1 of 2 runs have results" in page
    assert "| same run | 64 | 16 | 1 / 1 † |" in page and "same run: `tiny/vq_k64`" in page
    assert "| tiny VQ | 64 | 16 | 1 / 1 |" in page and "| longer | 64 | 16 | 0 / 1 | not yet run |" in page
