"""The CPU generation demo (scripts/generation_demo.py) end to end at toy scale: crops -> fvq train (tokenizer) ->
fvq encode -> fvq train (generator) -> fvq sample -> measures, in seconds; and the pieces that decide its numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import TINY_TOKENIZER

from fvq.data.transforms import sample_rng

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "generation_demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("generation_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_training_and_held_out_crops_never_overlap(demo):
    spec = demo.CropSpec(image_size=32, base_size=192, held_out_fraction=0.25, gap=4)
    for width, height in ((192, 192), (240, 240), (288, 192), (360, 240)):
        boundary = 0.75 * width
        for i in range(200):
            left, top = demo.crop_box(spec, "train", width, height, sample_rng(0, 0, i))
            assert 0 <= left and left + 32 <= boundary - 4 and 0 <= top <= height - 32
            left, top = demo.crop_box(spec, "val", width, height, sample_rng(0, 1, i))
            assert left >= boundary and left + 32 <= width and 0 <= top <= height - 32
    with pytest.raises(ValueError, match="does not fit"):
        demo.crop_box(spec, "val", 100, 100, sample_rng(0))


def test_nearest_class_is_the_histogram_of_highest_likelihood(demo):
    labels = np.array([0, 0, 1, 1])
    values = np.array([[0, 0, 1], [0, 0, 0], [2, 3, 3], [3, 3, 3]])  # class 0 uses codes 0/1, class 1 codes 2/3
    counts = demo.histogram_counts(values, labels, num_classes=2, bins=4)
    assert counts.tolist() == [[5, 1, 0, 0], [0, 0, 1, 5]]
    log_probs = demo.class_log_probs(counts)
    assert np.allclose(np.exp(log_probs[0]), [6 / 10, 2 / 10, 1 / 10, 1 / 10])  # (n + 1) / (n_c + V)
    assert demo.nearest_class(np.array([[0, 1, 0], [3, 2, 3], [0, 3, 3]]), log_probs).tolist() == [0, 1, 1]
    pixels = np.array([[[[0, 0, 0], [255, 255, 255], [32, 0, 255]]]], dtype=np.uint8)  # (1, 1, 3, 3)
    assert demo.colour_bins(pixels).tolist() == [[0, 511, 8 * 8 + 7]]


def test_demo_end_to_end_at_toy_scale(demo, tmp_path):
    out = tmp_path / "demo"
    tokenizer = [a for s in TINY_TOKENIZER for a in ("--tokenizer-set", s)]
    argv = [
        "--out", str(out), "--photos", "astronaut,coffee,rocket", "--image-size", "16", "--base-size", "64",
        "--train-per-class", "12", "--val-per-class", "6", "--tokenizer-steps", "2", *tokenizer,
        "--tokenizer-set", "global_batch_size=8", "--tokenizer-set", "val_batch_size=8",
        "--gpt-steps", "2", "--gpt-set", "global_batch_size=8", "--cfg-scales", "1,3", "--samples-per-class", "2",
        "--speed-batch", "2", "--speed-repeats", "1", "--figures", str(tmp_path / "figures"), "--threads", "1",
    ]  # fmt: skip
    assert demo.main(argv) == 0

    classes = ["astronaut", "coffee", "rocket"]
    for split, n in (("train", 12), ("val", 6)):
        for name in classes:
            assert len(list((out / "crops" / split / name).glob("*.png"))) == n
    for path in ("tokenizer/metrics.json", "tokens/train/meta.json", "tokens/val/meta.json", "gpt/model/config.json"):
        assert (out / path).is_file(), path
    assert json.loads((out / "tokens" / "train" / "meta.json").read_text())["class_names"] == classes
    for scale in ("1", "3"):
        assert len(list((out / "samples" / f"cfg_{scale}" / "images").glob("*.png"))) == 6
    for name in ("gen_cfg_grid.png", "gen_split.png", "gen_bits.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 0

    summary = json.loads((out / "summary.json").read_text())
    held_out = summary["held_out"]
    for key in ("bits_per_token", "class_unigram_bits", "unigram_bits", "uniform_bits", "accuracy"):
        assert math.isfinite(held_out[key]), key
    assert held_out["uniform_bits"] == pytest.approx(math.log2(64))
    assert set(summary["accuracy"]) == {"real training-region crops", "real held-out-region crops", "cfg 1", "cfg 3"}
    for figures in summary["accuracy"].values():
        assert figures["n"] == 6
        for region in ("held-out", "training"):
            for kind in ("codes", "colours"):
                assert 0 <= figures[f"{region} fit, {kind}"] <= 1
    # fitted on the held-out crops, the held-out crops' own colours are recognised (they sit in the fit)
    assert summary["accuracy"]["real held-out-region crops"]["held-out fit, colours"] > 1 / 3
    for case in summary["speed"].values():
        assert case["same_tokens"] and case["kv_cache"]["tokens_per_s"] > 0 and case["recompute"]["tokens_per_s"] > 0
    assert set(summary["timings"]) == set(demo.STAGES) and summary["total_seconds"] > 0
    assert [c["command"].split()[1] for c in summary["commands"]["tokens"]] == ["encode", "encode"]
    assert (out / "summary.md").read_text().startswith("CPU: ")
