"""Every experiment file of the suite parses, builds its config and its model (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fvq.models import Tokenizer
from fvq.repro.experiments import codebook_of, discover, load_variant, select
from fvq.repro.protocol import Protocol, required_images

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
VARIANTS = [v for vs in discover(EXPERIMENTS).values() for v in vs]


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.id for v in VARIANTS])
def test_experiment_builds_its_config_and_model(variant):
    config = variant.config(variant.seeds[0])
    protocol = Protocol.from_overrides(variant.protocol)
    assert config.seed == variant.seeds[0] and config.epochs is None and config.max_steps > 0
    assert variant.budget.train_minutes <= (30 if codebook_of(config.quantizer)["codebook_size"] > 16384 else 10)
    with torch.device("meta"):
        model = Tokenizer.from_config({"model": config.model, "quantizer": config.quantizer})
    # the protocol's held-out set holds at least 64 tokens per code
    side = config.data["image_size"] // model.downsample_factor
    per_image = model.quantizer.num_tokens if hasattr(model.quantizer, "num_tokens") else side * side
    per_image *= getattr(model.quantizer, "num_quantizers", 1)
    assert protocol.min_tokens_per_code == 64
    assert protocol.heldout_samples >= required_images(model.codebook_size, per_image, protocol)


def test_the_suite_has_its_own_base_config():
    # the demo's configs (fvq/configs/tiny_*.yaml) may change; the suite's runs must not change with them
    for variant in VARIANTS:
        path = (variant.path.parent / variant.base).resolve()
        assert path == EXPERIMENTS / "base.yaml", variant.id
    base = (EXPERIMENTS / "base.yaml").read_text()
    assert "model: {preset: tiny_f4}" in base  # ch 32, as every committed result was trained


def test_frozen_random_codebooks_start_at_a_usable_scale():
    # a frozen codebook keeps its initial scale for good: at the default 1/K the codes are too small to be told apart
    # through a linear map (a SimVQ run with it used 2 codes of 16,384), so the suite's SimVQ variants set D^-1/2
    for variant in VARIANTS:
        quantizer = codebook_of(variant.config(variant.seeds[0]).quantizer)
        if quantizer.get("freeze_codebook") and not quantizer.get("kmeans_init"):
            assert quantizer.get("init_scale") == quantizer["codebook_dim"] ** -0.5, variant.id


def test_suite_covers_the_claims():
    from fvq.repro.claims import CLAIMS

    suite = discover(EXPERIMENTS)
    for claim in CLAIMS:
        assert claim.experiment in suite, claim.experiment
        names = {v.name for v in suite[claim.experiment]}
        assert set(claim.needs) <= names, sorted(set(claim.needs) - names)


def test_a_quantizer_of_another_type_replaces_the_base_section(tmp_path):
    path = tmp_path / "ms.yaml"
    path.write_text(
        "base: tiny_vq\noverrides:\n  quantizer: {type: multiscale, scales: [1, 2, 8], "
        "quantizer: {type: vq, codebook_size: 32, codebook_dim: 8}}\nseeds: [3]\nbudget: {train_minutes: 1}\n"
    )
    config = load_variant(path).config(3)
    assert config.quantizer == {
        "type": "multiscale",
        "scales": [1, 2, 8],
        "quantizer": {"type": "vq", "codebook_size": 32, "codebook_dim": 8},
    }
    assert config.seed == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base: tiny_vq\nseeds: [0]\n", "missing key 'budget'"),
        ("base: tiny_vq\nseeds: [0]\nbudget: {train_minutes: 1}\nsteps: 3\n", "unknown keys \\['steps'\\]"),
        ("base: nope\nseeds: [0]\nbudget: {train_minutes: 1}\n", "neither a file nor a preset"),
        ("base: tiny_vq\nseeds: []\nbudget: {train_minutes: 1}\n", "seeds must be a non-empty list"),
        ("base: tiny_vq\nseeds: [0]\nbudget: {minutes: 1}\n", "budget must be a mapping with train_minutes"),
    ],
)
def test_malformed_experiment_files_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_variant(path)


def test_select_names_experiments_and_variants(tiny_suite):
    root = tiny_suite / "experiments"
    assert [v.id for v in select(root, "tiny")] == ["tiny/vq_k64"]
    assert [v.id for v in select(root, "tiny/vq_k64.yaml")] == ["tiny/vq_k64"]
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        select(root, "nope")
    with pytest.raises(ValueError, match="unknown variant 'x' of tiny"):
        select(root, "tiny/x")
