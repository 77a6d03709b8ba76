"""Choosing the search kernel: the measured choice, its cache and persisted table, the deterministic rule, the gate on
unverified kernels, and the AVX-512 kernel's build."""

import ctypes
import json
import shutil

import pytest
import torch

from fvq.quantizers import nearest_codes
from fvq.quantizers.search import blocked, dispatch
from fvq.quantizers.search import fused as fused_search


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """Auto mode, no measurements carried in or out, kernels cached in a temporary folder."""
    monkeypatch.setenv("FVQ_SEARCH_KERNEL", "auto")
    monkeypatch.delenv("FVQ_SEARCH_TUNING", raising=False)
    monkeypatch.setattr(dispatch, "_measured", {})


def _data(n=64, k=96, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randint(-3, 4, (n, d), generator=gen).float()
    codebook = torch.randint(-3, 4, (k, d), generator=gen).float()
    return z, codebook, blocked._squared_norms(codebook)


def _fake_run(delays, calls):
    """A ``run`` for :func:`dispatch.choose` that takes ``delays[kernel]`` seconds (busy wait) and counts calls."""
    import time

    def run(kernel, z, codebook, code_sq):
        calls.append(kernel)
        end = time.perf_counter() + delays[kernel]
        while time.perf_counter() < end:
            pass
        return torch.zeros(z.shape[0], dtype=torch.long)

    return run


def test_avx512_kernel_compiles_here(tmp_path):
    # compiling needs only the compiler: the AVX-512 translation unit is built (and its symbol found) on any x86-64
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    path = fused_search.build(tmp_path, kernel="avx512")
    assert path.name.startswith("nearest_codes_avx512-") and path.stat().st_size > 0
    assert ctypes.CDLL(str(path)).fvq_nearest_codes  # loading runs no AVX-512 instruction
    assert fused_search.build(tmp_path, kernel="avx2") != path  # its own shared object


def test_unverified_kernels_are_never_eligible(monkeypatch):
    assert "avx512" not in fused_search.VERIFIED_KERNELS
    monkeypatch.setattr(fused_search, "cpu_supports", lambda kernel: True)  # pretend an AVX-512 CPU
    monkeypatch.setattr(fused_search, "available", lambda kernel: (True, ""))
    kernels = dispatch.eligible(torch.device("cpu"))
    assert "avx512" not in kernels and kernels[:2] == ["avx2", "blocked"]
    # the deterministic rule on that CPU: its widest ISA is unverified, so the blocked search
    assert dispatch.rule(torch.device("cpu"), kernels) == "blocked"
    monkeypatch.setattr(fused_search, "VERIFIED_KERNELS", frozenset({"avx2", "avx512"}))
    assert dispatch.eligible(torch.device("cpu"))[:3] == ["avx512", "avx2", "blocked"]


@pytest.mark.skipif(fused_search.cpu_supports("avx512"), reason="checks the refusal on a CPU without AVX-512F")
def test_forcing_avx512_without_the_isa_says_why(monkeypatch):
    monkeypatch.setenv("FVQ_SEARCH_KERNEL", "avx512")
    z, codebook, _ = _data()
    with pytest.raises(fused_search.FusedKernelUnavailable, match="needs AVX512F; this CPU lacks it"):
        nearest_codes(z, codebook)


def test_measured_choice_takes_the_fastest_and_is_kept(monkeypatch):
    monkeypatch.setattr(dispatch, "eligible", lambda device: ["avx2", "blocked"])
    monkeypatch.setattr(dispatch, "MIN_MEASURED_WORK", 1)
    z, codebook, sq = _data()
    calls = []
    choice = dispatch.choose(z, codebook, sq, _fake_run({"avx2": 0.004, "blocked": 0.001}, calls))
    assert choice.kernel == "blocked" and choice.sample == (64, 96, 8)
    assert choice.reason.startswith("measured on 64 x 96 x 8") and "GFLOP/s" in choice.reason
    assert choice.seconds["blocked"] < choice.seconds["avx2"]
    assert calls.count("avx2") == calls.count("blocked") == 1 + dispatch._ROUNDS  # warm-up, then alternating
    again = dispatch.choose(z, codebook, sq, _fake_run({"avx2": 0.0, "blocked": 0.0}, calls))
    assert again is choice and len(calls) == 2 * (1 + dispatch._ROUNDS)  # cached for the shape class
    assert dispatch.last_choice() is choice


def test_persisted_choice_is_read_back(monkeypatch, tmp_path):
    monkeypatch.setenv("FVQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FVQ_SEARCH_TUNING", "persist")
    monkeypatch.setattr(dispatch, "eligible", lambda device: ["avx2", "blocked"])
    monkeypatch.setattr(dispatch, "MIN_MEASURED_WORK", 1)
    z, codebook, sq = _data()
    first = dispatch.choose(z, codebook, sq, _fake_run({"avx2": 0.001, "blocked": 0.003}, []))
    assert first.kernel == "avx2"
    table = json.loads((tmp_path / "search-dispatch.json").read_text())
    (key,) = table
    assert fused_search.cpu_model() in key and table[key]["kernel"] == "avx2"
    dispatch.clear_measurements()  # a later process

    def refuse(*args):
        raise AssertionError("a stored choice must not be measured again")

    later = dispatch.choose(z, codebook, sq, refuse)
    assert later.kernel == "avx2" and "stored in" in later.reason


def test_deterministic_rule_without_a_measurement(monkeypatch):
    monkeypatch.setattr(dispatch, "eligible", lambda device: ["avx2", "blocked"])
    monkeypatch.setattr(fused_search, "cpu_supports", lambda kernel: kernel == "avx2")
    z, codebook, sq = _data()

    def refuse(*args):
        raise AssertionError("nothing should be measured")

    small = dispatch.choose(z, codebook, sq, refuse)  # 64 x 96 x 8 is far below MIN_MEASURED_WORK
    assert small.kernel == "avx2" and "too small to time" in small.reason
    monkeypatch.setattr(dispatch, "MIN_MEASURED_WORK", 1)
    monkeypatch.setenv("FVQ_SEARCH_TUNING", "off")
    off = dispatch.choose(z, codebook, sq, refuse)
    assert off.kernel == "avx2" and "FVQ_SEARCH_TUNING=off" in off.reason
    monkeypatch.setenv("FVQ_SEARCH_TUNING", "measure")

    def broken(kernel, *args):
        raise RuntimeError("scratch memory")

    failed = dispatch.choose(z, codebook, sq, broken)
    assert failed.kernel == "avx2" and "measurement failed (scratch memory)" in failed.reason


def test_tuning_mode_is_checked(monkeypatch):
    monkeypatch.setenv("FVQ_SEARCH_TUNING", "sometimes")
    monkeypatch.setattr(dispatch, "MIN_MEASURED_WORK", 1)
    monkeypatch.setattr(dispatch, "eligible", lambda device: ["avx2", "blocked"])
    z, codebook, _ = _data()
    with pytest.raises(ValueError, match="FVQ_SEARCH_TUNING must be one of measure, persist, off; got 'sometimes'"):
        nearest_codes(z, codebook)


def test_auto_measures_real_kernels_and_stays_exact(monkeypatch):
    monkeypatch.setattr(dispatch, "MIN_MEASURED_WORK", 1)
    z, codebook, sq = _data(n=300, k=700, d=6, seed=3)
    dist = (z.double()[:, None] - codebook.double()[None]).square().sum(-1)  # (N, K)
    got = nearest_codes(z, codebook)
    choice = dispatch.last_choice()
    assert torch.equal(got, dist.argmin(dim=1))
    assert choice.kernel in dispatch.eligible(torch.device("cpu"))
    if len(dispatch.eligible(torch.device("cpu"))) > 1:
        assert choice.reason.startswith("measured") and set(choice.seconds) == set(dispatch.eligible(z.device))


def test_non_finite_inputs_are_recorded_as_the_blocked_search():
    z, codebook, _ = _data()
    codebook[3, 0] = float("inf")
    nearest_codes(z, codebook)
    assert dispatch.last_choice().kernel == "blocked" and "non-finite" in dispatch.last_choice().reason


def test_gpus_are_offered_blocked_and_coarse_only(monkeypatch):
    from fvq.quantizers.search import coarse

    native = coarse.native_bf16(torch.device("cpu"))
    assert ("coarse" in dispatch.eligible(torch.device("cpu"))) == native  # CPUs: only with native bf16
    monkeypatch.setattr(coarse, "native_bf16", lambda device: True)
    assert dispatch.eligible(torch.device("cuda")) == ["blocked", "coarse"]
    monkeypatch.setattr(coarse, "native_bf16", lambda device: False)
    assert dispatch.eligible(torch.device("cuda")) == ["blocked"]


def test_a_gpu_search_knows_its_kernel_without_reading_values(monkeypatch):
    # Off the CPU, nearest_codes runs the blocked search without the finiteness check (two host reads) wherever
    # known_choice settles on it from shapes and settings alone; a shape class that still needs measuring is None.
    from types import SimpleNamespace

    from fvq.quantizers.search import coarse

    cuda = torch.device("cuda")
    z, codebook = SimpleNamespace(device=cuda, shape=(8192, 256)), SimpleNamespace(shape=(16384, 256))
    monkeypatch.setattr(coarse, "native_bf16", lambda device: False)
    assert dispatch.known_choice(z, codebook).kernel == "blocked"  # the only eligible kernel
    monkeypatch.setattr(coarse, "native_bf16", lambda device: True)
    assert dispatch.known_choice(z, codebook) is None  # blocked or coarse: measured on the first call
    measured = dispatch.Choice("blocked", "measured")
    dispatch._measured[(*dispatch.shape_class(cuda, 8192, 16384, 256), ("blocked", "coarse"))] = measured
    assert dispatch.known_choice(z, codebook) is measured  # later calls of that shape class
    monkeypatch.setenv("FVQ_SEARCH_TUNING", "off")
    assert dispatch.known_choice(z, codebook).kernel == "blocked"  # the rule
    monkeypatch.delenv("FVQ_SEARCH_TUNING")
    monkeypatch.setenv("FVQ_SEARCH_KERNEL", "coarse")
    assert dispatch.known_choice(z, codebook).kernel == "coarse"  # forced: nearest_codes checks finiteness first
