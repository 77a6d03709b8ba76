"""Every shipped tokenizer preset loads and builds (on the meta device: no memory, no init cost), and the quantizer
presets of the paper's baselines and variants hold what their names promise."""

import pytest
import torch
import yaml
from torch import nn

from fvq.models import Tokenizer
from fvq.quantizers.projectors import LinearProjector, MLPProjector
from fvq.quantizers.residual import ResidualQuantizer
from fvq.quantizers.vq_bridge import VQBridge
from fvq.training.config import CONFIG_DIR, load_config

TOKENIZER_PRESETS = sorted(
    p.stem
    for p in CONFIG_DIR.glob("*.yaml")
    if (yaml.safe_load(p.read_text()) or {}).get("task", "tokenizer") == "tokenizer"
)


def _tokenizer(name: str) -> Tokenizer:
    config = load_config(name)
    with torch.device("meta"):
        return Tokenizer.from_config({"model": config.model, "quantizer": config.quantizer})


@pytest.mark.parametrize("name", TOKENIZER_PRESETS)
def test_every_tokenizer_preset_loads_and_builds(name):
    assert _tokenizer(name).quantizer.codebook_size >= 2


def test_the_baseline_and_variant_presets_are_shipped():
    assert {
        "simvq_16k_imagenet",
        "simvq_262k_imagenet",
        "mlp5_262k_imagenet",
        "vqgan_lc_16k_imagenet",
        "vqgan_lc_100k_imagenet",
        "fvq_rq_16k_imagenet",
    } <= set(TOKENIZER_PRESETS)


def test_simvq_presets_freeze_the_codebook_behind_a_linear_map():
    for name, k in (("simvq_16k_imagenet", 16_384), ("simvq_262k_imagenet", 262_144)):
        q = _tokenizer(name).quantizer
        assert q.freeze_codebook and isinstance(q.projector, LinearProjector) and q.codebook_size == k
        assert "codebook" not in dict(q.named_parameters())


def test_mlp5_preset_is_five_linear_layers_with_relu():
    q = _tokenizer("mlp5_262k_imagenet").quantizer
    assert isinstance(q.projector, MLPProjector) and not q.freeze_codebook
    layers = list(q.projector.net)
    assert sum(isinstance(m, nn.Linear) for m in layers) == 5 and sum(isinstance(m, nn.ReLU) for m in layers) == 4


@pytest.mark.parametrize("name, k", [("vqgan_lc_16k_imagenet", 16_384), ("vqgan_lc_100k_imagenet", 100_000)])
def test_vqgan_lc_presets_cluster_vgg16_features_into_a_frozen_codebook(name, k):
    q = _tokenizer(name).quantizer
    assert q.freeze_codebook and q.kmeans_init and q.features_source["encoder"] == "vgg16"
    assert q.codebook.shape == (k, 512) and q.codebook_dim == 8
    assert isinstance(q.projector, LinearProjector) and q.projector.input_dim == 512
    assert q.features_source["num_images"] * 14 * 14 >= k  # enough relu5_3 positions at 224 px


def test_rq_preset_is_the_papers_table_4_row():
    tokenizer = _tokenizer("fvq_rq_16k_imagenet")
    q = tokenizer.quantizer
    assert isinstance(q, ResidualQuantizer) and q.shared and q.num_quantizers == 4
    assert q.codebook_loss == "cumulative" and (q.codebook_size, q.codebook_dim) == (16_384, 256)
    assert isinstance(q.quantizer_at(0).projector, VQBridge) and q.quantizer_at(0).projector.group_size == 16
    assert tokenizer.downsample_factor == 32  # 8 x 8 x 4 tokens at 256 px
    assert load_config("fvq_rq_16k_imagenet").epochs == 10
