"""The quantizer benchmark runs end to end on tiny settings and prints one row per case."""

from __future__ import annotations

import argparse
import json

import pytest

from fvq.bench import quantizers as benchmark


def test_benchmark_tiny_in_process(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    out_json = tmp_path / "bench.json"
    args = parser.parse_args(
        ["--tokens", "256", "--dim", "8", "--codebook-size", "64", "--repeats", "1", "--in-process", "--threads", "1"]
        + ["--only", "vq", "fsq", "residual(4, shared)", "--json", str(out_json)]
    )
    assert benchmark.run(args) == 0
    printed = capsys.readouterr().out
    for name in ("vq", "fsq", "residual(4, shared)"):
        assert any(line.startswith(name + " ") for line in printed.splitlines())
    results = json.loads(out_json.read_text())
    assert set(results) == {"vq", "fsq", "residual(4, shared)"}
    assert all(r["ms"] > 0 for r in results.values())


def test_benchmark_cases_cover_every_family_and_reject_unknown_names():
    configs = benchmark.bench_configs(dim=8, codebook_size=64)
    from fvq.quantizers.registry import QUANTIZERS

    assert {c["type"] for c in configs.values()} >= {"vq", "fsq", "lfq", "bsq", "residual", "grouped", "multiscale"}
    assert {c["type"] for c in configs.values()} <= set(QUANTIZERS)
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    with pytest.raises(ValueError, match="unknown benchmark cases"):
        benchmark.run(parser.parse_args(["--only", "nope", "--in-process"]))
