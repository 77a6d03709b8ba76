"""The search benchmark and the ``fvq bench`` command: measurements, the brute-force check, dispatch."""

import argparse
import subprocess
import sys

import pytest
import torch

from fvq.bench import search as search_benchmark
from fvq.cli import main
from fvq.commands import bench


def test_measure_search_agrees_with_brute_force():
    result = search_benchmark.measure_search(300, 64, 16, 3, torch.device("cpu"), baseline_max_bytes=2**30)
    assert result["K"] == 300 and result["N"] == 64 and result["D"] == 16
    assert result["seconds"] > 0 and result["gflops"] > 0 and result["sgemm_gflops"] > 0
    # one paired ratio per timed call, none above the best-against-best one's own call (that sgemm is <= the best)
    assert len(result["paired_ratios"]) == 3 and all(r > 0 for r in result["paired_ratios"])
    assert result["paired_ratio"] == sorted(result["paired_ratios"])[1]
    assert max(result["paired_ratios"]) >= result["ratio"] * (1 - 1e-9)
    assert len(result["sustained_ratios"]) == 3 and result["sustained_ratio"] == sorted(result["sustained_ratios"])[1]
    assert result["kernel"] in ("avx2", "blocked") and result["kernel_reason"]
    assert result["wrong"] == 0
    assert result["peak_mib"] >= 0
    assert "coarse_seconds" not in result  # only when asked


def test_sustained_sgemm_counts_every_call_of_the_stretch(monkeypatch):
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(search_benchmark, "best_time", lambda fn, repeats, device: (fn(), 0.01)[1])  # one call: 10 ms
    monkeypatch.setattr(search_benchmark.torch, "mm", lambda *a, **k: (calls.append(1), real_mm(*a, **k))[1])
    rate = search_benchmark.sustained_sgemm_gflops(torch.device("cpu"), 0.05, size=64)
    assert len(calls) == 1 + 5 and rate > 0  # the call that measured one, then 0.05 s / 10 ms back to back


def test_measure_search_reports_the_coarse_search(monkeypatch):
    monkeypatch.setattr(search_benchmark, "sgemm_gflops", lambda device, size=2048, repeats=7: 100.0)  # not timed here
    result = search_benchmark.measure_search(
        300, 64, 16, 1, torch.device("cpu"), baseline_max_bytes=2**30, coarse_repeats=1
    )
    assert result["coarse_seconds"] > 0 and result["coarse_paired_ratio"] > 0
    assert 1 <= result["coarse_mean_candidates"] <= result["coarse_max_candidates"] <= 64
    assert result["coarse_fallback_rows"] == 0 and result["coarse_wrong"] == 0
    if result["kernel"] == "avx2":  # the re-rank shares the fused kernel's fp32 order
        assert result["coarse_differs"] == 0


def test_hardware_peak_is_cores_times_clock_times_flops_per_cycle(monkeypatch):
    monkeypatch.setattr(search_benchmark, "_cpuinfo_mhz", lambda: 2450.0)
    monkeypatch.setattr(search_benchmark.fused, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    peak = search_benchmark.hardware_peak(2)
    assert peak["isa"] == "AVX2 + FMA" and peak["flop_per_cycle"] == 32 and peak["ghz_source"].startswith("/proc")
    assert peak["gflops"] == pytest.approx(min(2, peak["cores"]) * 2.45 * 32)
    monkeypatch.setattr(search_benchmark.fused, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    monkeypatch.setattr(search_benchmark.fused, "cpu_model", lambda: "AMD EPYC 9654 96-Core Processor")
    assert search_benchmark.hardware_peak(2)["flop_per_cycle"] == 32  # Zen 4: 512-bit FMAs on 256-bit pipes
    monkeypatch.setattr(search_benchmark.fused, "cpu_model", lambda: "Intel(R) Xeon(R) Platinum 8480+")
    assert search_benchmark.hardware_peak(2)["flop_per_cycle"] == 64


def test_compare_with_brute_force_flags_a_wrong_index():
    z = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    codebook = torch.tensor([[0.0, 0.0], [5.0, 5.0], [9.0, 9.0]])
    assert search_benchmark._compare_with_brute_force(z, codebook, torch.tensor([0, 1])) == {
        "mismatches": 0,
        "wrong": 0,
    }
    assert search_benchmark._compare_with_brute_force(z, codebook, torch.tensor([0, 2])) == {
        "mismatches": 1,
        "wrong": 1,
    }


def test_measure_vq_step_reports_time_and_memory():
    result = search_benchmark.measure_vq_step(128, 32, 8, 1, torch.device("cpu"))
    assert result["seconds"] > 0 and result["peak_mib"] >= 0 and result["memory_method"]


def test_vq_step_against_vector_quantize_pytorch_alternates_both_on_one_input():
    pytest.importorskip("vector_quantize_pytorch", reason="optional comparison: pip install vector-quantize-pytorch")
    result = search_benchmark.measure_vq_step(128, 32, 8, 3, torch.device("cpu"), against_lucidrains=True)
    assert result["lucidrains_seconds"] > 0 and result["lucidrains_peak_mib"] >= 0 and result["lucidrains_version"]
    assert result["speedup"] > 0 and result["seconds"] > 0


def test_comparison_without_vector_quantize_pytorch_says_how_to_install_it(monkeypatch, capsys):
    real_find_spec = search_benchmark.importlib.util.find_spec
    monkeypatch.setattr(
        search_benchmark.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "vector_quantize_pytorch" else real_find_spec(name, *a),
    )
    code = main(["bench", "search", "--codebook-sizes", "--vq", "128:32", "--against-vector-quantize-pytorch"])
    assert code == 2
    err = capsys.readouterr().err
    assert "pip install vector-quantize-pytorch" in err and "after torch" in err


def test_peak_memory_sees_a_large_allocation():
    # The benchmark measures each case in a fresh process (a long-lived one may serve the block from memory it
    # already holds), so the check runs in one too.
    code = (
        "import torch; from fvq.bench import search as b; m = b.PeakMemory(torch.device('cpu')); "
        "m.start(); x = torch.ones(32 * 2**20 // 4); print(m.stop())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) >= 24 * 2**20


def test_vq_case_parsing():
    assert search_benchmark._vq_case("16384:8192") == (16384, 8192)
    with pytest.raises(argparse.ArgumentTypeError, match="K:N"):
        search_benchmark._vq_case("16384x8192")


def test_bench_without_a_name_lists_the_benchmarks(capsys):
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "search" in err and "quantizers" in err


def test_bench_reports_a_missing_benchmark_module(monkeypatch, capsys):
    monkeypatch.setitem(bench.BENCHMARKS, "quantizers", ("fvq.bench.no_such_benchmark", "missing"))
    assert main(["bench", "quantizers"]) == 2
    assert "not available" in capsys.readouterr().err


def test_bench_search_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "search", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--memory-check" in out and "--codebook-sizes" in out and "--coarse" in out


@pytest.mark.slow
def test_bench_search_end_to_end(capsys):
    code = main(["bench", "search", "--tokens", "64", "--dim", "8", "--codebook-sizes", "200", "--vq", "300:50"])
    out = capsys.readouterr().out
    assert code == 0
    assert "nearest_codes" in out and "VectorQuantizer" in out and "yes" in out
    assert "hardware FMA peak" in out and "kernel chosen" in out and "coarse pass + exact re-rank" in out
