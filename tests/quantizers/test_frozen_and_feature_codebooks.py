"""Frozen codebooks (SimVQ), codebooks initialised from encoder features (VQGAN-LC), the MLP projector's activation.

The feature tests use the real VGG16 trunk that LPIPS ships offline; they skip when no weights are installed, unless
``FVQ_REQUIRE_LPIPS_WEIGHTS=1`` (set by ``make test``) turns the skip into a failure.
"""

import os

import pytest
import torch
import yaml
from torch import nn

from fvq.cli import main
from fvq.quantizers import build_quantizer
from fvq.quantizers.feature_init import (
    check_kmeans_source,
    encoder_features,
    feature_codebook,
    source_features,
    source_images,
    vgg16_trunk,
)
from fvq.quantizers.projectors import LinearProjector, MLPProjector
from fvq.runs import list_checkpoints, load_checkpoint
from fvq.weights import WeightsNotFoundError

VQ = {"type": "vq", "codebook_size": 32, "codebook_dim": 8}
IMAGES = {"type": "embedded", "image_size": 32}
SOURCE = {"type": "features", "encoder": "vgg16", "layer": "relu2_2", "images": IMAGES, "num_images": 4}


def _vgg_or_skip() -> None:
    from fvq.losses.lpips import find_weights

    try:
        find_weights("vgg16")
    except WeightsNotFoundError as err:
        if os.environ.get("FVQ_REQUIRE_LPIPS_WEIGHTS") == "1":
            pytest.fail(f"VGG16 weights required but missing: {err}")
        pytest.skip(f"no VGG16 weights installed ({err})")


def _train(tmp_path, quantizer: dict, steps: int = 2) -> list[dict]:
    """A few steps of the real ``fvq train`` on a tiny autoencoder; the checkpoints of every step."""
    config = {
        "model": {"preset": "tiny_f4"},
        "quantizer": quantizer,
        "data": {"type": "embedded", "image_size": 16, "samples_per_epoch": 16, "val_samples": 8},
        "loss": {"reconstruction_loss": "l2", "perceptual_weight": 0.0, "adversarial_weight": 0.0},
        "optim": {"lr": 1.0e-3},
        "global_batch_size": 4,
        "max_steps": steps,
        "precision": "fp32",
        "log_every": 1,
        "val_every": 100,
        "checkpoint_every": 1,
        "val_batch_size": 4,
        "val_psnr_images": 2,
        "tensorboard": False,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 0
    return [load_checkpoint(p)["model"] for p in list_checkpoints(tmp_path / "run" / "checkpoints")]


# ---- frozen codebook ---------------------------------------------------------------------------------------------
def test_frozen_codebook_is_a_buffer_with_the_same_state_dict_key():
    frozen = build_quantizer({**VQ, "freeze_codebook": True, "projector": "linear"})
    assert "codebook" in dict(frozen.named_buffers()) and "codebook" not in dict(frozen.named_parameters())
    trained = build_quantizer({**VQ, "projector": "linear"})
    assert set(frozen.state_dict()) == set(trained.state_dict())
    frozen.load_state_dict(trained.state_dict())
    assert torch.equal(frozen.codebook, trained.codebook)


def test_frozen_codebook_without_projector_has_no_codebook_term():
    q = build_quantizer({**VQ, "freeze_codebook": True})
    out = q(torch.randn(16, 8))
    assert set(out.losses) == {"commitment"}
    assert (
        "codebook" in build_quantizer({**VQ, "freeze_codebook": True, "projector": "linear"})(torch.randn(4, 8)).losses
    )


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"codebook_update": "ema"}, "cannot be combined with codebook_update='ema'"),
        ({"restart_strategy": "random"}, "cannot be combined with restart_strategy='random'"),
        ({"orthogonality_weight": 0.1}, "leaves nothing to train"),
        ({"estimator": "ibq"}, "leaves nothing to train"),
    ],
)
def test_frozen_codebook_refuses_what_would_move_or_train_it(keys, match):
    with pytest.raises(ValueError, match=match):
        build_quantizer({**VQ, "freeze_codebook": True, **keys})


def test_frozen_codebook_gets_no_update_from_a_real_training_step(tmp_path):
    # SimVQ: frozen codebook, trained linear projector
    simvq = {**VQ, "codebook_size": 64, "codebook_dim": 16, "freeze_codebook": True, "projector": "linear"}
    first, second = _train(tmp_path, simvq)
    assert torch.equal(first["quantizer.codebook"], second["quantizer.codebook"])
    assert not torch.equal(first["quantizer.projector.linear.weight"], second["quantizer.projector.linear.weight"])
    assert not torch.equal(first["encoder.conv_in.weight"], second["encoder.conv_in.weight"])


# ---- MLP projector activation ------------------------------------------------------------------------------------
def test_mlp_projector_defaults_to_the_authors_relu_and_takes_gelu_by_name():
    default = MLPProjector(8)
    assert sum(isinstance(m, nn.ReLU) for m in default.net) == 4 and len(default.net) == 9  # MLP-5
    gelu = build_quantizer({**VQ, "projector": {"type": "mlp", "activation": "gelu"}}).projector
    assert sum(isinstance(m, nn.GELU) for m in gelu.net) == 4
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        build_quantizer({**VQ, "projector": {"type": "mlp", "activation": "swish"}})


# ---- feature-initialised codebook (VQGAN-LC) ---------------------------------------------------------------------
def test_features_come_from_the_training_split_by_default():
    """The codebook is built from the images the tokenizer trains on, never from the held-out photos."""
    from fvq.data.build import build_dataset

    source = check_kmeans_source(SOURCE)
    images = torch.cat(list(source_images(source)))  # (4, 3, 32, 32)
    train = build_dataset(IMAGES, "train")
    assert torch.equal(images, torch.stack([train[i].image for i in range(4)]))
    held_out = torch.cat(list(source_images(check_kmeans_source({**SOURCE, "split": "val"}))))
    assert not torch.equal(images, held_out)


def test_features_source_is_checked_with_clear_messages():
    assert check_kmeans_source("latents") is None
    filled = check_kmeans_source(SOURCE)
    assert filled["seed"] == 0 and filled["batch_size"] == 32 and filled["split"] == "train"
    bad = [
        ({**SOURCE, "split": "holdout"}, "split must be 'train', 'val' or 'test'"),
        ({**SOURCE, "encoder": "clip"}, "encoder must be one of"),
        ({**SOURCE, "layer": "relu9"}, "has layers"),
        ({k: v for k, v in SOURCE.items() if k != "images"}, "needs 'images'"),
        ({**SOURCE, "num_images": 0}, "num_images must be an integer >= 1"),
        ({**SOURCE, "colour": 1}, "unknown keys"),
        ({"type": "pixels"}, "type must be one of"),
    ]
    for source, match in bad:
        with pytest.raises(ValueError, match=match):
            check_kmeans_source(source)
    with pytest.raises(ValueError, match="kmeans_init is False"):
        build_quantizer({**VQ, "kmeans_source": SOURCE, "projector": "linear"})
    with pytest.raises(ValueError, match="128 channels but codebook_dim is 8"):
        build_quantizer({**VQ, "kmeans_init": True, "kmeans_source": SOURCE})
    with pytest.raises(ValueError, match="maps D -> D only"):
        build_quantizer({**VQ, "kmeans_init": True, "kmeans_source": SOURCE, "projector": "mlp"})


def test_feature_codebook_has_the_feature_width_and_a_linear_projector_to_d():
    q = build_quantizer(
        {**VQ, "kmeans_init": True, "kmeans_source": SOURCE, "freeze_codebook": True, "projector": "linear"}
    )
    assert q.codebook.shape == (32, 128) and q.codebook_vectors().shape == (32, 8)
    assert isinstance(q.projector, LinearProjector) and q.projector.input_dim == 128
    assert q.export().codebook.shape == (32, 8)


def test_sampled_features_are_rows_of_the_features():
    features = torch.randn(200, 5)
    codebook = feature_codebook(features, 16, iters=0, seeding="random", seed=3)
    matches = (codebook[:, None, :] == features[None]).all(-1)  # (16, 200)
    assert (matches.sum(1) == 1).all() and matches.any(0).sum() == 16  # 16 distinct feature vectors
    assert torch.equal(codebook, feature_codebook(features, 16, iters=0, seeding="random", seed=3))


@pytest.mark.parametrize("kmeans", [{"kmeans_iters": 2}, {"kmeans_iters": 0, "kmeans_seeding": "random"}])
def test_feature_initialised_codebook_equals_the_vgg16_features_it_was_built_from(kmeans):
    _vgg_or_skip()
    torch.manual_seed(0)
    config = {**VQ, "kmeans_init": True, "kmeans_source": SOURCE, "freeze_codebook": True, "projector": "linear"}
    q = build_quantizer({**config, **kmeans})
    before = q.codebook.clone()
    q(torch.randn(16, 8))  # the first training forward pass computes the features and writes the codebook once
    assert bool(q.initted) and not torch.equal(q.codebook, before)
    source = check_kmeans_source(SOURCE)
    features = encoder_features(vgg16_trunk("relu2_2"), source_images(source))  # (4 * 16 * 16, 128)
    assert features.shape == (4 * 16 * 16, 128)
    torch.testing.assert_close(features, source_features(source))
    expected = feature_codebook(
        features, 32, iters=kmeans["kmeans_iters"], seeding=kmeans.get("kmeans_seeding", "kmeans++"), seed=0
    )
    assert torch.equal(q.codebook, expected)
    if kmeans["kmeans_iters"] == 0:  # sampled: every code is one of the features
        assert (q.codebook[:, None, :] == features[None]).all(-1).any(1).all()
    written = q.codebook.clone()
    q(torch.randn(16, 8))
    assert torch.equal(q.codebook, written)  # once only


@pytest.mark.slow
def test_vqgan_lc_training_keeps_the_feature_codebook(tmp_path):
    _vgg_or_skip()
    source = {**SOURCE, "num_images": 2}
    quantizer = {
        "type": "vq",
        "codebook_size": 64,
        "codebook_dim": 16,
        "kmeans_init": True,
        "kmeans_iters": 2,
        "kmeans_source": source,
        "freeze_codebook": True,
        "projector": "linear",
    }
    first, second = _train(tmp_path, quantizer)
    expected = feature_codebook(source_features(check_kmeans_source(source)), 64, iters=2, seed=0)
    assert torch.equal(first["quantizer.codebook"], expected)
    assert torch.equal(second["quantizer.codebook"], expected)
    assert bool(second["quantizer.initted"])
