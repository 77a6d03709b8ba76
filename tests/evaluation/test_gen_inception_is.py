"""The IS classifier (pytorch-fid's state-dict layout) and the FID Inception's spatial (sFID) features.

The reader is tested on state dicts in that layout with random weights. With the FID Inception installed, the
classifier network is also checked against it: given the FID Inception's own weights, it computes the same pool
features, which verifies the block definitions (TF-style average pools, the max pool of ``Mixed_7c``).
"""

from __future__ import annotations

import os

import pytest
import torch

from fvq.evaluation import inception_is
from fvq.evaluation.inception import FEATURE_DIM, SPATIAL_DIM, find_packaged_inception, load_inception
from fvq.evaluation.inception_is import (
    IS_INCEPTION_ENV,
    NUM_CLASSES,
    PT_INCEPTION_FILENAME,
    PT_INCEPTION_SHA256,
    ClassifierInception,
    find_classifier_weights,
    load_classifier_inception,
    load_state_dict_into,
    shares_trunk,
)
from fvq.weights import WeightsNotFoundError, sha256_file

needs_inception = pytest.mark.skipif(find_packaged_inception() is None, reason="FID Inception weights not installed")


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    monkeypatch.delenv(IS_INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path


@pytest.fixture(scope="module")
def random_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = ClassifierInception()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _save(state_dict, path) -> str:
    torch.save(state_dict, path)
    return sha256_file(path)


@pytest.fixture(scope="module")
def fid_inception():
    if find_packaged_inception() is None:
        pytest.skip("FID Inception weights not installed")
    return load_inception()


# --------------------------------------------------------------------------------------------------- the layout


def test_state_dict_layout_is_pytorch_fids():
    keys = ClassifierInception().state_dict()
    shapes = {k: tuple(v.shape) for k, v in keys.items()}
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Conv2d_4a_3x3.bn.running_var"] == (192,)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert shapes["Mixed_7a.branch7x7x3_4.conv.weight"] == (192, 192, 3, 3)
    assert shapes["Mixed_7c.branch3x3dbl_3b.bn.running_var"] == (384,)
    assert shapes["fc.weight"] == (NUM_CLASSES, FEATURE_DIM) and shapes["fc.bias"] == (NUM_CLASSES,)
    assert not any(k.startswith("AuxLogits") for k in keys)
    assert len(ClassifierInception().convolutions()) == 94
    assert len([k for k in keys if not k.endswith("num_batches_tracked")]) == 94 * 5 + 2


def test_reader_loads_a_random_state_dict_and_gives_1008_logits(tmp_path, no_weights, random_state_dict):
    digest = _save(random_state_dict, tmp_path / "w.pth")
    model = load_classifier_inception(tmp_path / "w.pth", sha256=digest)
    assert model.sha256 == digest and model.path == tmp_path / "w.pth" and not model.training
    assert torch.equal(model.fc.weight, random_state_dict["fc.weight"])
    x = torch.rand(2, 3, 75, 75) * 2 - 1  # the smallest input the stem accepts
    out = model(x)
    assert out.pool.shape == (2, FEATURE_DIM) and out.logits.shape == (2, NUM_CLASSES)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    assert torch.allclose(out.logits, out.pool @ random_state_dict["fc.weight"].T, atol=1e-5)  # no bias
    model.train()
    assert not model.training


def test_reader_accepts_files_without_num_batches_tracked(tmp_path, no_weights, random_state_dict):
    trimmed = {k: v for k, v in random_state_dict.items() if not k.endswith("num_batches_tracked")}
    digest = _save(trimmed, tmp_path / "w.pth")
    load_classifier_inception(tmp_path / "w.pth", sha256=digest)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("Mixed_6c.branch7x7_3.conv.weight"), r"1 missing keys \(e.g. \['Mixed_6c.branch7x7_3"),
        (lambda sd: sd.pop("fc.weight"), r"missing keys \(e.g. \['fc.weight'\]"),
        (lambda sd: sd.update({"AuxLogits.fc.weight": torch.zeros(1008, 768)}), "1 unexpected keys"),
        (lambda sd: sd.update({"fc.weight": torch.zeros(1000, 2048)}), r"fc.weight: \(1000, 2048\), expected"),
    ],
)
def test_reader_refuses_incomplete_or_foreign_state_dicts(tmp_path, no_weights, random_state_dict, edit, message):
    sd = dict(random_state_dict)
    edit(sd)
    digest = _save(sd, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=message) as err:
        load_classifier_inception(tmp_path / "w.pth", sha256=digest)
    assert PT_INCEPTION_FILENAME in str(err.value)


def test_reader_checks_the_checksum_and_refuses_pickled_objects(tmp_path, no_weights, random_state_dict):
    _save(random_state_dict, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=f"expected {PT_INCEPTION_SHA256}.*--inception-is-sha256"):
        load_classifier_inception(tmp_path / "w.pth")
    torch.save({"model": ClassifierInception()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_classifier_inception(tmp_path / "pickled.pth", sha256=sha256_file(tmp_path / "pickled.pth"))
    with pytest.raises(ValueError, match="state dict of tensors"):
        load_state_dict_into(ClassifierInception(), {"a": 1}, "x")


def test_finding_the_weights(tmp_path, no_weights, monkeypatch):
    file, why = find_classifier_weights()
    assert file is None and "--inception-is" in why and IS_INCEPTION_ENV in why
    with pytest.raises(WeightsNotFoundError, match="not found at"):
        find_classifier_weights(tmp_path / "missing.pth")
    with pytest.raises(WeightsNotFoundError):
        load_classifier_inception()
    monkeypatch.setenv(IS_INCEPTION_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsNotFoundError, match="not a file"):
        find_classifier_weights()
    monkeypatch.delenv(IS_INCEPTION_ENV)
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / inception_is.TORCH_FIDELITY_FILENAME).write_bytes(b"x")
    file, source = find_classifier_weights()
    assert file == hub / inception_is.TORCH_FIDELITY_FILENAME and "torch.hub" in source
    (tmp_path / "env.pth").write_bytes(b"x")
    monkeypatch.setenv(IS_INCEPTION_ENV, str(tmp_path / "env.pth"))
    assert find_classifier_weights() == (tmp_path / "env.pth", f"${IS_INCEPTION_ENV}")


# -------------------------------------------------------------------------------- against the real FID network


def _fid_layout_state_dict(fid_network, fc_weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The FID Inception's weights in pytorch-fid's layout (units matched in the order both networks run them)."""
    params = [p.detach().float() for _, p in fid_network.net.layers.named_parameters()]  # weight, beta, mean, var
    names = [n for n, m in ClassifierInception().named_modules() if isinstance(m, inception_is.BasicConv2d)]
    assert len(params) == 4 * len(names) == 4 * 94
    out = {}
    for i, name in enumerate(names):
        weight, beta, mean, var = params[4 * i : 4 * i + 4]
        out[f"{name}.conv.weight"] = weight.clone()
        out[f"{name}.bn.weight"] = torch.ones_like(beta)
        out[f"{name}.bn.bias"] = beta.clone()
        out[f"{name}.bn.running_mean"] = mean.clone()
        out[f"{name}.bn.running_var"] = var.clone()
    out["fc.weight"], out["fc.bias"] = fc_weight, torch.zeros(NUM_CLASSES)
    return out


@needs_inception
def test_classifier_with_the_fid_weights_computes_the_fid_pool_features(fid_inception, tmp_path, no_weights):
    fc = torch.randn(NUM_CLASSES, FEATURE_DIM, generator=torch.Generator().manual_seed(1)) / 40
    digest = _save(_fid_layout_state_dict(fid_inception.network, fc), tmp_path / "w.pth")
    classifier = load_classifier_inception(tmp_path / "w.pth", sha256=digest)
    assert shares_trunk(classifier, fid_inception.network)
    assert not shares_trunk(ClassifierInception(), fid_inception.network)
    images = torch.randint(0, 256, (2, 3, 48, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x = fid_inception.preprocess(images)
    ours, theirs = classifier(x), fid_inception.run_network(x)
    assert torch.allclose(ours.pool, theirs.pool, atol=1e-5)
    assert torch.allclose(ours.logits, classifier.logits_from_pool(theirs.pool), atol=1e-4)


@needs_inception
def test_spatial_features_are_mixed_6_conv_first_7_channels_in_hwc_order(fid_inception):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    feats = fid_inception.pool_and_spatial(images)
    assert feats.pool.shape == (2, FEATURE_DIM) and feats.spatial.shape == (2, SPATIAL_DIM)
    assert torch.equal(feats.pool, fid_inception(images))  # the block-by-block run is the network's forward
    x = fid_inception.preprocess(images)
    layers = fid_inception.network.net.layers
    with torch.inference_mode():
        h = x
        for name, block in layers.named_children():
            if name == "mixed_6":
                break
            h = block(h)
        conv = layers.mixed_6.conv(h)  # (2, 192, 17, 17), after its ReLU
        assert torch.equal(layers.mixed_6(h)[:, :192], conv)  # the block's first branch
    assert conv.shape == (2, 192, 17, 17) and (conv >= 0).all()
    hwc = feats.spatial.view(2, 17, 17, 7)
    for c in range(7):
        assert torch.equal(hwc[..., c], conv[:, c])


def test_trunk_of_a_foreign_network_is_refused():
    from fvq.evaluation.inception import FIDInception

    class NotInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

    with pytest.raises(ValueError, match="sFID"):
        FIDInception(NotInception(), "0" * 64).run_network(torch.zeros(1, 3, 299, 299))
    assert not shares_trunk(ClassifierInception(), NotInception())


@pytest.mark.skipif(not os.environ.get(IS_INCEPTION_ENV), reason=f"${IS_INCEPTION_ENV} not set")
def test_pytorch_fid_file_loads_and_shares_the_fid_trunk(fid_inception):
    classifier = load_classifier_inception()
    assert classifier.sha256 == PT_INCEPTION_SHA256
    assert shares_trunk(classifier, fid_inception.network)
