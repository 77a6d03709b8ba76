"""The toy experiment (FVQ Figure 2): library run, metrics, and a run through the real ``fvq toy`` command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fvq.toy import CURVE_KEYS, METHODS, ToyConfig, curve_steps, make_targets, run_toy, save_figures, set_metrics

TINY = dict(steps=12, codebook_size=16, num_targets=64, log_every=5, bridge_hidden_dim=16, bridge_heads=2)


@pytest.fixture(scope="module")
def tiny_result():
    return run_toy(ToyConfig(**TINY))


def test_run_returns_every_method_with_sane_metrics(tiny_result):
    cfg = tiny_result.config
    assert list(tiny_result.methods) == list(METHODS)
    assert tiny_result.curve_steps == [0, 5, 10, 12]
    for r in tiny_result.methods.values():
        assert 0.0 <= r.final["usage"] <= 1.0 and 0.0 <= r.final["latent_usage"] <= 1.0
        assert math.isfinite(r.final["distance"]) and r.final["distance"] >= 0
        assert 1.0 <= r.final["perplexity"] <= cfg.codebook_size + 1e-6
        assert r.final["dead_codes"] == pytest.approx(cfg.codebook_size * (1 - r.final["usage"]))
        assert set(r.curves) == set(CURVE_KEYS)
        assert all(len(v) == len(tiny_result.curve_steps) for v in r.curves.values())
        assert r.curves["usage"][-1] == r.final["usage"]  # last curve point is the final state
        assert r.trajectory_ze.shape == r.trajectory_zq.shape == (cfg.steps + 1, cfg.dim)
        assert r.codes.shape == (cfg.codebook_size, cfg.dim)
        assert int(r.code_counts.sum()) == cfg.num_targets
        # every recorded z_q is one of the codes of its step; the last one is a final code
        assert torch.isclose(r.codes, r.trajectory_zq[-1]).all(dim=1).any()
    assert tiny_result.methods["vq"].final["projector_params"] == 0
    assert tiny_result.methods["linear"].final["projector_params"] == cfg.dim * cfg.dim + cfg.dim
    # training moved the tracked latent
    assert not torch.equal(tiny_result.methods["vq"].trajectory_ze[0], tiny_result.methods["vq"].trajectory_ze[-1])


def test_methods_share_the_initial_state(tiny_result):
    starts = [r.trajectory_ze[0] for r in tiny_result.methods.values()]
    assert all(torch.equal(starts[0], s) for s in starts[1:])
    lr = [r.curves["lr_factor"] for r in tiny_result.methods.values()]
    assert lr[0] == lr[1] == lr[2] and lr[0][0] == pytest.approx(0.005)  # learning annealing starts at 0.005


def test_seeded_and_deterministic():
    a = run_toy(ToyConfig(**TINY, methods=("vq", "vqbridge")))
    b = run_toy(ToyConfig(**TINY, methods=("vq", "vqbridge")))
    for name in a.methods:
        assert a.methods[name].curves == b.methods[name].curves
        assert torch.equal(a.methods[name].codes, b.methods[name].codes)
    c = run_toy(ToyConfig(**{**TINY, "seed": 1}, methods=("vq",)))
    assert not torch.equal(a.targets, c.targets)


def test_set_metrics_known_values():
    targets = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [10.0, 0.0]])
    codes = torch.tensor([[0.0, 0.0], [3.0, 0.0], [100.0, 100.0], [10.0, 0.0]])
    latents = torch.tensor([[0.0, 1.0], [3.0, 0.0], [3.0, 0.0], [10.0, 0.0]])
    m = set_metrics(targets, latents, codes)
    assert m["usage"] == 0.75  # codes 0, 1 and 3 are nearest to some target
    assert m["dead_codes"] == 1
    assert m["distance"] == pytest.approx((0 + 4 + 4 + 0) / 4)  # Euclidean, mean over targets
    assert m["latent_distance"] == pytest.approx(1 / 4)
    assert m["task_loss"] == pytest.approx((0 + 16 + 16 + 0) / 8)  # z_q of the latents vs targets, mean over N*D
    assert m["perplexity"] == pytest.approx(math.exp(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))))
    with pytest.raises(ValueError, match="codes"):
        set_metrics(targets, latents, codes[:, :1])


def test_targets_lie_on_a_ring_in_a_plane():
    cfg = ToyConfig(dim=6, num_targets=500, mode_std=0.0, ring_radius=2.0, num_modes=5)
    p = make_targets(cfg, torch.Generator().manual_seed(0))
    assert p.shape == (500, 6)
    assert torch.allclose(p.norm(dim=1), torch.full((500,), 2.0), atol=1e-5)
    assert torch.linalg.matrix_rank(p, atol=1e-4) == 2
    assert len(torch.unique(p.round(decimals=4), dim=0)) == 5


def test_curve_steps_cover_start_and_end():
    assert curve_steps(10, 4) == [0, 4, 8, 10]
    assert curve_steps(3, 10) == [0, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"methods": ("vq", "kmeans")}, "methods"),
        ({"codebook_size": 24, "bridge_group_size": 16}, "must divide codebook_size"),
        ({"steps": 0}, "steps"),
        ({"lr": -1.0}, "lr"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ToyConfig(**kwargs)


def test_high_dim_figures_use_pca(tiny_result, tmp_path):
    result = run_toy(ToyConfig(**{**TINY, "dim": 5, "steps": 4}, methods=("vq", "linear")))
    paths = save_figures(result, tmp_path, prefix="x_")
    assert sorted(Path(p).name for p in paths) == ["x_codes.png", "x_trajectories.png", "x_usage.png"]
    for p in paths:
        with Image.open(p) as im:
            im.verify()


def test_cli_writes_results_and_figures(tmp_path):
    out = tmp_path / "toy"
    cmd = [sys.executable, "-m", "fvq", "toy", "--out", str(out), "--no-progress"]
    cmd += ["--steps", "10", "--codebook-size", "16", "--num-targets", "64", "--log-every", "4"]
    cmd += ["--bridge-hidden-dim", "16", "--bridge-heads", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "VQ + VQBridge" in proc.stdout and "D(P,C)" in proc.stdout
    summary = json.loads((out / "results.json").read_text())
    assert summary["config"]["steps"] == 10 and summary["config"]["codebook_size"] == 16
    assert summary["curve_steps"] == [0, 4, 8, 10]
    assert set(summary["methods"]) == set(METHODS)
    for entry in summary["methods"].values():
        final = entry["final"]
        assert 0.0 <= final["usage"] <= 1.0
        assert math.isfinite(final["distance"]) and math.isfinite(final["perplexity"])
        assert all(len(entry["curves"][k]) == 4 for k in CURVE_KEYS)
        assert len(entry["trajectory"]["z_e"]) == 11 and len(entry["trajectory"]["z_e"][0]) == 2
    for name in ("trajectories.png", "usage.png", "codes.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100


def test_cli_rejects_bad_group_size(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "fvq", "toy", "--out", str(tmp_path), "--codebook-size", "24"]
    cmd += ["--bridge-group-size", "16", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert "must divide codebook_size" in proc.stderr
    assert not (tmp_path / "results.json").exists()
