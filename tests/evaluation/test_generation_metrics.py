"""Generation metrics: the math on constructed features, the readers, make-ref, the feature cache, distribution.

The Inception here is a cheap stand-in with the FID Inception's interface (features are fixed random projections of
8x8 thumbnails), so these tests exercise every code path in well under a second each; the real network is used in
``test_gen_cli.py`` and ``test_gen_inception_is.py``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import zipfile

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fvq.evaluation import generation as gen
from fvq.evaluation.generation import (
    Activations,
    Gaussian,
    NpzArrayReader,
    compute_activations,
    evaluate_samples,
    fid_to_reference,
    frechet_to_gaussian,
    inception_score,
    load_reference,
    make_reference_batch,
    manifold_radii,
    open_samples,
    precision_recall,
    sfid_to_reference,
)
from fvq.evaluation.inception import FEATURE_DIM, SPATIAL_DIM, InceptionFeatures
from fvq.evaluation.inception_is import ClassifierInception
from fvq.weights import sha256_file


class FakeInception(nn.Module):
    """FIDInception's interface at no cost: pool/spatial features are random projections of 8x8 thumbnails."""

    protocol = "fake-inception|thumbnail-8"

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w_pool", torch.randn(3 * 64, FEATURE_DIM, generator=g) / 8)
        self.register_buffer("w_spatial", torch.randn(3 * 64, SPATIAL_DIM, generator=g) / 8)
        self.images_seen = 0

    def preprocess(self, images: torch.Tensor, *, value_range=(-1.0, 1.0)) -> torch.Tensor:
        u = images.float() if images.dtype == torch.uint8 else (images.float() + 1) * 127.5
        return F.interpolate(u / 127.5 - 1, size=(75, 75), mode="bilinear")  # the classifier's smallest input

    def run_network(self, x: torch.Tensor) -> InceptionFeatures:
        self.images_seen += x.shape[0]
        f = F.adaptive_avg_pool2d(x, 8).flatten(1)  # (B, 192)
        return InceptionFeatures(pool=(f @ self.w_pool).relu(), spatial=f @ self.w_spatial)


@pytest.fixture
def fake():
    return FakeInception()


@pytest.fixture
def no_classifier(monkeypatch, tmp_path):
    """No IS weights anywhere: no env var, an empty torch.hub folder."""
    monkeypatch.delenv("FVQ_IS_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _features_with_moments(mean: np.ndarray, variances: np.ndarray, n: int, seed: int = 0) -> torch.Tensor:
    """``(n, D)`` features whose sample mean is ``mean`` and whose unbiased covariance is ``diag(variances)`` exactly
    (``variances`` may hold at most ``n - 1`` nonzero entries)."""
    nonzero = np.flatnonzero(variances)
    assert nonzero.size <= n - 1
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.concatenate([np.ones((n, 1)), rng.normal(size=(n, nonzero.size))], axis=1))[0][:, 1:]
    x = np.tile(mean, (n, 1))
    x[:, nonzero] += basis * np.sqrt((n - 1) * variances[nonzero])
    assert np.allclose(x.mean(0), mean) and np.allclose(np.cov(x, rowvar=False), np.diag(variances), atol=1e-9)
    return torch.from_numpy(x)


# ------------------------------------------------------------------------------------------------ FID and sFID


@pytest.mark.parametrize("n", [400, 6])  # more features than dimensions (eigh path) and fewer (N x N path)
def test_frechet_distance_of_known_gaussians_equals_closed_form(n):
    d = 8
    rng = np.random.default_rng(1)
    mean, mu_ref = rng.normal(size=d), rng.normal(size=d)
    variances = rng.uniform(0.5, 2.0, size=d)
    if n <= d:
        variances[n - 1 :] = 0.0
    ref_var = rng.uniform(0.5, 2.0, size=d)
    features = _features_with_moments(mean, variances, n)
    expected = float(((mean - mu_ref) ** 2).sum() + ((np.sqrt(variances) - np.sqrt(ref_var)) ** 2).sum())
    got = frechet_to_gaussian(features, torch.from_numpy(mu_ref), torch.from_numpy(np.diag(ref_var)))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("n", [300, 5])
def test_frechet_distance_matches_the_sqrtm_formula(n):
    d = 12
    rng = np.random.default_rng(2)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    r = rng.normal(size=(500, d)) @ rng.normal(size=(d, d))
    mu_r, s_r = r.mean(0), np.cov(r, rowvar=False)
    mu_x, s_x = x.mean(0), np.cov(x, rowvar=False)  # what ADM computes from activations
    covmean = scipy.linalg.sqrtm(s_x @ s_r).real
    expected = float((mu_x - mu_r) @ (mu_x - mu_r) + np.trace(s_x) + np.trace(s_r) - 2 * np.trace(covmean))
    got = frechet_to_gaussian(torch.from_numpy(x).float(), mu_r, s_r)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_gaussian_of_features_is_numpy_mean_and_cov():
    x = torch.randn(1000, 7, dtype=torch.float64) * 3 + 5
    g = Gaussian.of_features(x.float(), chunk_size=64)
    assert np.allclose(g.mu.numpy(), x.float().double().mean(0).numpy())
    assert np.allclose(g.sigma.numpy(), np.cov(x.float().double().numpy(), rowvar=False), atol=1e-10)
    with pytest.raises(ValueError, match="N >= 2"):
        Gaussian.of_features(torch.zeros(1, 7))


def test_fid_and_sfid_check_their_feature_dimensions():
    mu, sigma = np.zeros(FEATURE_DIM), np.eye(FEATURE_DIM)
    pool = torch.randn(4, FEATURE_DIM)
    assert fid_to_reference(pool, mu, sigma) > 0
    with pytest.raises(ValueError, match="2048"):
        fid_to_reference(torch.randn(4, 100), mu, sigma)
    with pytest.raises(ValueError, match="2023"):
        sfid_to_reference(torch.randn(4, SPATIAL_DIM), mu, sigma)
    spatial = torch.randn(4, SPATIAL_DIM)
    assert sfid_to_reference(spatial, np.zeros(SPATIAL_DIM), np.eye(SPATIAL_DIM)) > 0


# ------------------------------------------------------------------------------------------- precision / recall


def _brute_force_pr(ref: np.ndarray, smp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_radii = np.sort(sq(ref, ref), axis=1)[:, k]
    s_radii = np.sort(sq(smp, smp), axis=1)[:, k]
    d = sq(ref, smp)  # (N1, N2)
    precision = float((d <= r_radii[:, None]).any(0).mean())
    recall = float((d <= s_radii[None, :]).any(1).mean())
    return r_radii, s_radii, precision, recall


def test_manifold_radius_is_the_kth_neighbour_with_the_point_itself_as_0th():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assert manifold_radii(x, k=1, device="cpu").tolist() == [1.0, 1.0, 4.0, 9.0, 16.0]
    assert manifold_radii(x, k=3, device="cpu").tolist() == [36.0, 25.0, 9.0, 25.0, 81.0]
    with pytest.raises(ValueError, match="more than 5"):
        manifold_radii(x, k=5, device="cpu")


def test_precision_recall_identical_sets_are_one():
    x = torch.randn(40, 16)
    pr = precision_recall(x, x.clone(), k=3, device="cpu")
    assert (pr.precision, pr.recall) == (1.0, 1.0)
    assert (pr.k, pr.num_reference, pr.num_samples) == (3, 40, 40)


def test_precision_recall_far_apart_sets_are_zero():
    ref = torch.randn(30, 16)
    pr = precision_recall(ref, torch.randn(25, 16) + 100.0, k=3, device="cpu")
    assert (pr.precision, pr.recall) == (0.0, 0.0)


def test_precision_recall_dropped_mode_keeps_precision_and_loses_recall():
    g = torch.Generator().manual_seed(0)
    mode_a = torch.randn(20, 8, generator=g)
    mode_b = torch.randn(30, 8, generator=g) + 50.0
    pr = precision_recall(torch.cat([mode_a, mode_b]), mode_a.clone(), k=3, device="cpu")
    assert pr.precision == 1.0  # every sample is a reference point
    assert pr.recall == pytest.approx(20 / 50)  # the reference's second mode is never generated


@pytest.mark.parametrize("block", [7, 10000])
def test_precision_recall_blocks_match_a_brute_force(block):
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(37, 5)).astype(np.float32)
    smp = (rng.normal(size=(29, 5)) * 1.3 + 0.4).astype(np.float32)
    r_radii, s_radii, precision, recall = _brute_force_pr(ref.astype(np.float64), smp.astype(np.float64), 3)
    kw = {"k": 3, "row_batch_size": block, "col_batch_size": block, "device": "cpu"}
    assert np.allclose(manifold_radii(torch.from_numpy(ref), **kw).numpy(), r_radii, rtol=1e-5)
    assert np.allclose(manifold_radii(torch.from_numpy(smp), **kw).numpy(), s_radii, rtol=1e-5)
    pr = precision_recall(torch.from_numpy(ref), torch.from_numpy(smp), **kw)
    assert (pr.precision, pr.recall) == (precision, recall)
    assert 0.0 < precision < 1.0 and 0.0 < recall < 1.0


def test_precision_recall_rejects_bad_inputs():
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(torch.randn(10, 4), torch.randn(10, 5), device="cpu")
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(torch.randn(3, 4), torch.randn(10, 4), device="cpu")
    with pytest.raises(ValueError, match="non-finite"):
        precision_recall(torch.full((10, 4), float("nan")), torch.randn(10, 4), device="cpu")


# --------------------------------------------------------------------------------------------- Inception Score


def _one_hot_logits(labels: np.ndarray, num_classes: int, scale: float = 100.0) -> torch.Tensor:
    return torch.from_numpy(np.eye(num_classes)[labels] * scale)


def test_inception_score_uniform_predictions_score_one():
    score = inception_score(torch.zeros(100, 1008), split_size=30)
    assert score.mean == pytest.approx(1.0, abs=1e-12)
    assert len(score.splits) == 4 and score.num_samples == 100


def test_inception_score_of_confident_balanced_classes_is_the_class_count():
    labels = np.repeat(np.arange(10), 20)  # 200 samples, 10 classes, sorted
    score = inception_score(_one_hot_logits(labels, 10), split_size=200, seed=None)
    assert score.mean == pytest.approx(10.0, rel=1e-9)
    assert score.std == 0.0


def test_inception_score_shuffle_makes_class_sorted_files_score_like_random_order():
    labels = np.repeat(np.arange(10), 500)  # 5,000 samples sorted by class
    sorted_logits = _one_hot_logits(labels, 10)
    # ADM's file order: each split of 500 holds one class, so the score collapses to 1
    assert inception_score(sorted_logits, split_size=500, seed=None).mean == pytest.approx(1.0, abs=1e-9)
    shuffled = inception_score(sorted_logits, split_size=500, seed=0).mean
    random_order = torch.from_numpy(np.random.default_rng(5).permutation(5000))
    other = inception_score(sorted_logits[random_order], split_size=500, seed=0).mean
    assert shuffled > 9.5 and other > 9.5
    assert shuffled == pytest.approx(other, rel=0.02)


def test_inception_score_matches_adm_formula_on_random_logits():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(250, 1008)) * 3
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(0, 250, 100):  # ADM: splits in file order, the last one shorter
        part = preds[i : i + 100]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    score = inception_score(torch.from_numpy(logits).float(), split_size=100, seed=None)
    assert score.mean == pytest.approx(float(np.mean(scores)), rel=1e-5)
    assert score.std == pytest.approx(float(np.std(scores)), rel=1e-4)
    with pytest.raises(ValueError, match="non-finite"):
        inception_score(torch.tensor([[float("inf"), 0.0]]))


# ---------------------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_array_reader_reads_row_ranges(tmp_path, compressed):
    images = _images(23)
    path = tmp_path / "s.npz"
    (np.savez_compressed if compressed else np.savez)(path, images, np.arange(23))
    with NpzArrayReader(path, "arr_0") as reader:
        assert reader.shape == (23, 16, 16, 3) and reader.dtype == np.uint8 and reader.compressed == compressed
        assert np.array_equal(reader.read(5, 11), images[5:11])
        assert np.array_equal(reader.read(0, 3), images[0:3])  # backwards: reopens the stream
        assert np.array_equal(reader.read(20, 99), images[20:])
        assert reader.read(30, 40).shape == (0, 16, 16, 3)
    with pytest.raises(ValueError, match="no array 'arr_9'"):
        NpzArrayReader(path, "arr_9")


def test_open_samples_npz_streams_batches_in_order(tmp_path):
    images, labels = _images(10), np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    np.savez(tmp_path / "s.npz", images, labels)
    s = open_samples(tmp_path / "s.npz")
    assert (s.kind, s.num_images, s.image_size) == ("npz", 10, (16, 16))
    assert np.array_equal(s.labels, labels) and "arr_1" in s.labels_source
    batches = list(s.batches(2, 9, batch_size=3))
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    assert batches[0].dtype == torch.uint8 and batches[0].shape[1:] == (3, 16, 16)
    got = torch.cat(batches).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, images[2:9])


def test_open_samples_folder_sorted_and_checked(tmp_path):
    images = _images(5, size=12)
    folder = tmp_path / "samples"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / ("sub" if i == 4 else "") / f"{i:03d}.png")
    s = open_samples(folder)
    assert (s.kind, s.num_images, s.image_size) == ("folder", 5, (12, 12))
    got = torch.cat(list(s.batches(0, 5, batch_size=2))).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, images)  # sorted paths: 000..003.png, then sub/004.png
    Image.fromarray(_images(1, size=13)[0]).save(folder / "002.png")
    with pytest.raises(ValueError, match=r"^\S*002\.png is 13x13 but the samples are 12x12"):
        list(open_samples(folder).batches(0, 5, batch_size=5, num_workers=1))  # raised here, named, not wrapped
    (folder / "003.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"^\S*003\.png: not a recognised image"):
        list(open_samples(folder).batches(3, 5, batch_size=5, num_workers=1))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": _images(3)}, "has no arr_0"),
        ({"arr_0": _images(3).astype(np.float32)}, "must be uint8"),
        ({"arr_0": _images(3)[..., 0]}, "N x H x W x 3"),
        ({"arr_0": _images(3).transpose(0, 3, 1, 2)}, "N x H x W x 3"),
        ({"arr_0": _images(3), "arr_1": np.arange(4)}, "holds 4 labels but arr_0 holds 3"),
        ({"arr_0": _images(3), "arr_1": np.zeros(3)}, "integer array"),
    ],
)
def test_open_samples_rejects_wrong_layouts(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        open_samples(tmp_path / "bad.npz")


def test_open_samples_missing_or_not_npz(tmp_path):
    with pytest.raises(FileNotFoundError, match="do not exist"):
        open_samples(tmp_path / "none.npz")
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an .npz"):
        open_samples(tmp_path / "x.npz")
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="must be an .npz"):
        open_samples(tmp_path / "x.png")


def _stats(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(6, dim)) / 10
    return rng.normal(size=dim), a.T @ a + np.diag(rng.uniform(0.5, 1.5, size=dim))


def _write_ref(path, *, images=None, stats=True, sstats=True, **extra) -> None:
    arrays = dict(extra)
    if images is not None:
        arrays["arr_0"] = images
    if stats:
        arrays["mu"], arrays["sigma"] = _stats(FEATURE_DIM, 0)
    if sstats:
        arrays["mu_s"], arrays["sigma_s"] = _stats(SPATIAL_DIM, 1)
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"mu": np.zeros(FEATURE_DIM)}, "only one of 'mu' and 'sigma'"),
        ({"mu": np.zeros(10), "sigma": np.eye(10)}, r"expected mu \(2048,\)"),
        ({"mu": np.zeros(FEATURE_DIM, np.int64), "sigma": np.eye(FEATURE_DIM, dtype=np.int64)}, "floating"),
        ({"arr_0": np.zeros((4, 100), np.float32)}, "N x 2048 float pool features"),
        ({"arr_0": _images(2)[..., :2]}, "N x H x W x 3"),
        ({"labels": np.arange(3)}, "neither stored mu/sigma nor arr_0 images"),
    ],
)
def test_load_reference_rejects_wrong_layouts(tmp_path, arrays, message):
    np.savez(tmp_path / "ref.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_reference(tmp_path / "ref.npz", cache=False)


def test_load_reference_reads_stored_statistics(tmp_path):
    _write_ref(tmp_path / "ref.npz", images=_images(6))
    ref = load_reference(tmp_path / "ref.npz", cache=tmp_path / "cache")
    mu, sigma = _stats(FEATURE_DIM, 0)
    assert ref.content == "images" and ref.num_images == 6 and ref.image_size == (16, 16)
    assert np.array_equal(ref.fid.mu.numpy(), mu) and np.array_equal(ref.fid.sigma.numpy(), sigma)
    assert ref.sfid.mu.shape == (SPATIAL_DIM,)
    import hashlib

    assert ref.sha256 == hashlib.sha256((tmp_path / "ref.npz").read_bytes()).hexdigest()
    assert len(list((tmp_path / "cache" / "sha256").iterdir())) == 1  # memoised by path, size and mtime
    with pytest.raises(FileNotFoundError, match="--make-ref"):
        load_reference(tmp_path / "missing.npz")


# -------------------------------------------------------------------------------------------- evaluate_samples


def test_compute_activations_takes_tensors_and_adm_arrays(fake):
    images = _images(7)
    from_arrays = compute_activations([images[:4], images[4:]], fake, progress=False)
    as_tensors = torch.from_numpy(images).permute(0, 3, 1, 2)
    batches = [(as_tensors[:4], torch.zeros(4)), (as_tensors[4:], torch.zeros(3))]
    from_tensors = compute_activations(batches, fake, progress=False)
    assert isinstance(from_arrays, Activations) and len(from_arrays) == 7 and from_arrays.logits is None
    assert from_arrays.pool.shape == (7, FEATURE_DIM) and from_arrays.spatial.shape == (7, SPATIAL_DIM)
    assert torch.equal(from_arrays.pool, from_tensors.pool)  # same batches: the same numbers
    # one batch of 7: CPU kernels chosen by batch shape may round the last bits differently
    whole = compute_activations([(as_tensors, torch.zeros(7))], fake, progress=False)
    torch.testing.assert_close(whole.pool, from_arrays.pool, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="N x H x W x 3"):
        compute_activations([images[..., 0]], fake, progress=False)


def test_stored_statistics_are_used_not_recomputed(tmp_path, fake, no_classifier):
    np.savez(tmp_path / "s.npz", _images(8, seed=1))
    ref_images = _images(6, seed=2)
    _write_ref(tmp_path / "ref.npz", images=ref_images)
    m = evaluate_samples(tmp_path / "s.npz", tmp_path / "ref.npz", inception=fake, cache=False, progress=False)
    acts = compute_activations([_images(8, seed=1)], FakeInception(), progress=False)
    mu, sigma = _stats(FEATURE_DIM, 0)
    mu_s, sigma_s = _stats(SPATIAL_DIM, 1)
    assert m.metrics["fid"] == pytest.approx(frechet_to_gaussian(acts.pool, mu, sigma), rel=1e-9)
    assert m.metrics["sfid"] == pytest.approx(frechet_to_gaussian(acts.spatial, mu_s, sigma_s), rel=1e-9)
    from_images = compute_activations([ref_images], FakeInception(), progress=False)
    recomputed = Gaussian.of_features(from_images.pool)
    assert m.metrics["fid"] != pytest.approx(frechet_to_gaussian(acts.pool, recomputed.mu, recomputed.sigma))
    assert m.reference["fid_statistics"] == "mu/sigma stored in ref.npz"
    assert m.counts["fid"] == {"samples": 8, "reference": "stored"}
    assert m.counts["precision"] == {"samples": 8, "reference": 6}
    assert fake.images_seen == 8 + 6  # the reference images only for precision / recall


def test_reference_without_stored_statistics_uses_its_images(tmp_path, fake, no_classifier):
    np.savez(tmp_path / "s.npz", _images(8, seed=1))
    ref_images = _images(6, seed=2)
    _write_ref(tmp_path / "ref.npz", images=ref_images, stats=False, sstats=False)
    m = evaluate_samples(tmp_path / "s.npz", tmp_path / "ref.npz", inception=fake, cache=False, progress=False)
    acts = compute_activations([_images(8, seed=1)], FakeInception(), progress=False)
    ref_acts = compute_activations([ref_images], FakeInception(), progress=False)
    g = Gaussian.of_features(ref_acts.pool)
    assert m.metrics["fid"] == pytest.approx(frechet_to_gaussian(acts.pool, g.mu, g.sigma), rel=1e-9)
    assert "computed from the 6 arr_0 images" in m.reference["fid_statistics"]
    assert m.counts["fid"]["reference"] == 6


def test_reference_with_feature_array_and_no_images(tmp_path, fake, no_classifier):
    np.savez(tmp_path / "s.npz", _images(8, seed=1))
    ref_pool = torch.rand(12, FEATURE_DIM)
    _write_ref(tmp_path / "ref.npz", images=ref_pool.numpy())
    m = evaluate_samples(tmp_path / "s.npz", tmp_path / "ref.npz", inception=fake, cache=False, progress=False)
    acts = compute_activations([_images(8, seed=1)], FakeInception(), progress=False)
    pr = precision_recall(ref_pool, acts.pool, device="cpu")
    assert (m.metrics["precision"], m.metrics["recall"]) == (pr.precision, pr.recall)
    assert fake.images_seen == 8
    _write_ref(tmp_path / "stats-only.npz")
    m = evaluate_samples(tmp_path / "s.npz", tmp_path / "stats-only.npz", inception=fake, cache=False, progress=False)
    assert "fid" in m.metrics and "precision" not in m.metrics
    assert "no arr_0" in m.unavailable["precision"]


def test_inception_score_unavailable_without_weights(tmp_path, fake, no_classifier):
    np.savez(tmp_path / "s.npz", _images(8))
    _write_ref(tmp_path / "ref.npz", images=_images(6, seed=2))
    m = evaluate_samples(tmp_path / "s.npz", tmp_path / "ref.npz", inception=fake, cache=False, progress=False)
    assert "inception_score" not in m.metrics and "inception_score_std" not in m.metrics
    reason = m.unavailable["inception_score"]
    assert "pt_inception-2015-12-05-6726825d.pth" in reason and "--inception-is" in reason
    assert "| Inception Score | unavailable |" in m.to_markdown()
    assert m.protocol["classifier"] is None


def test_unusable_weights_found_in_the_environment_leave_the_rest_computed(tmp_path, fake, no_classifier, monkeypatch):
    (tmp_path / "other.pth").write_bytes(b"not the classifier")
    monkeypatch.setenv("FVQ_IS_INCEPTION_WEIGHTS", str(tmp_path / "other.pth"))
    np.savez(tmp_path / "s.npz", _images(8))
    _write_ref(tmp_path / "ref.npz")
    m = evaluate_samples(tmp_path / "s.npz", tmp_path / "ref.npz", inception=fake, cache=False, progress=False)
    assert "fid" in m.metrics and "inception_score" not in m.metrics
    assert "cannot use it" in m.unavailable["inception_score"] and "SHA-256" in m.unavailable["inception_score"]
    with pytest.raises(ValueError, match="SHA-256"):  # the same file given explicitly is an error
        evaluate_samples(
            tmp_path / "s.npz", tmp_path / "ref.npz", inception=fake, classifier=tmp_path / "other.pth", cache=False
        )


def test_inception_score_with_a_classifier_of_another_trunk_and_its_logit_cache(tmp_path, fake, monkeypatch):
    torch.manual_seed(0)
    classifier = ClassifierInception()
    for p in classifier.parameters():
        p.data.normal_(0, 0.05)
    torch.save(classifier.state_dict(), tmp_path / "w.pth")
    digest = sha256_file(tmp_path / "w.pth")
    forward, seen = ClassifierInception.forward, []
    monkeypatch.setattr(ClassifierInception, "forward", lambda self, x: seen.append(len(x)) or forward(self, x))
    images = _images(6)
    np.savez(tmp_path / "s.npz", images)
    _write_ref(tmp_path / "ref.npz")
    kw = {"inception": fake, "cache": tmp_path / "c", "progress": False, "is_split_size": 4, "is_seed": 3}
    m = evaluate_samples(
        tmp_path / "s.npz", tmp_path / "ref.npz", classifier=tmp_path / "w.pth", **kw, classifier_sha256=digest
    )
    assert sum(seen) == 6 and fake.images_seen == 6
    logits = forward(classifier, fake.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2))).logits
    expected = inception_score(logits, split_size=4, seed=3)
    assert m.metrics["inception_score"] == pytest.approx(expected.mean, rel=1e-5)
    assert m.metrics["inception_score_std"] == pytest.approx(expected.std, rel=1e-4, abs=1e-7)
    assert m.counts["inception_score"]["samples"] == 6
    assert m.protocol["classifier"]["sha256"] == digest and "second pass" in m.protocol["classifier"]["trunk"]
    again = evaluate_samples(tmp_path / "s.npz", tmp_path / "ref.npz", classifier=classifier, **kw)
    assert sum(seen) == 12 and fake.images_seen == 6  # a classifier built in memory has no cached logits
    assert again.metrics["inception_score"] == pytest.approx(m.metrics["inception_score"], rel=1e-5)
    evaluate_samples(
        tmp_path / "s.npz", tmp_path / "ref.npz", classifier=tmp_path / "w.pth", **kw, classifier_sha256=digest
    )
    assert sum(seen) == 12 and fake.images_seen == 6  # the file's logits come from the cache


def test_report_holds_counts_sha256_crop_balance_and_settings(tmp_path, fake, no_classifier):
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, image in enumerate(_images(6, seed=3)):
        Image.fromarray(image).save(folder / f"{i}.png")
    settings = {"cfg_scale": 1.5, "top_k": 0, "num_classes": 4, "labels": [0, 1, 2, 0, 1, 2], "seed": 7}
    (folder / "sample_config.json").write_text(json.dumps(settings))
    _write_ref(tmp_path / "ref.npz", images=_images(6, seed=2))
    m = evaluate_samples(folder, tmp_path / "ref.npz", inception=fake, cache=False, num_workers=0, progress=False)
    assert m.class_balance == {
        "source": "labels in sample_config.json",
        "num_labels": 6,
        "classes_present": 3,
        "min_per_class": 2,
        "max_per_class": 2,
        "uniform": True,
        "num_classes": 4,
        "classes_missing": 1,
    }
    assert m.sample_settings == settings
    json_path, md_path = m.save(tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["metrics"] == m.metrics and data["reference"]["sha256"] == load_reference(tmp_path / "ref.npz").sha256
    md = md_path.read_text()
    for text in ("| FID |", "| 6 |", data["reference"]["sha256"], "resize and crop", "no crop", "cfg_scale=1.5"):
        assert text in md
    assert "3 classes, 2-2 images per class, 1 of 4 missing" in md
    (folder / "sample_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        evaluate_samples(folder, tmp_path / "ref.npz", inception=fake, cache=False, progress=False)


# ------------------------------------------------------------------------------------------- make-ref and cache


def _real_folder(path, n: int = 5) -> None:
    path.mkdir()
    rng = np.random.default_rng(9)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 24, 3), dtype=np.uint8)).save(path / f"{i}.png")


def test_make_ref_writes_an_adm_layout_file_that_eval_reads(tmp_path, fake, no_classifier):
    _real_folder(tmp_path / "real")
    out = tmp_path / "refs" / "ref.npz"
    ref = make_reference_batch(
        tmp_path / "real", out, image_size=16, inception=fake, cache=tmp_path / "c", num_workers=0, progress=False
    )
    assert fake.images_seen == 5
    with np.load(out) as f:
        assert set(f.files) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s", "fvq_info"}
        arr = f["arr_0"]
        assert arr.dtype == np.uint8 and arr.shape == (5, 16, 16, 3)
        acts = compute_activations([arr], FakeInception(), progress=False)
        g = Gaussian.of_features(acts.pool)
        assert np.allclose(f["mu"], g.mu.numpy()) and np.allclose(f["sigma"], g.sigma.numpy())
        assert f["mu_s"].shape == (SPATIAL_DIM,) and f["sigma_s"].shape == (SPATIAL_DIM, SPATIAL_DIM)
        info = json.loads(str(f["fvq_info"]))
    assert info["num_images"] == 5 and info["image_size"] == 16 and "ADM centre crop" in info["crop"]
    assert ref.fid is not None and ref.info == info and not list(out.parent.glob(".*"))
    # scoring against it reads the stored statistics and takes the reference features from the cache
    np.savez(tmp_path / "s.npz", _images(7))
    m = evaluate_samples(tmp_path / "s.npz", out, inception=fake, cache=tmp_path / "c", progress=False)
    assert fake.images_seen == 5 + 7
    assert m.reference["fid_statistics"] == "mu/sigma stored in ref.npz"
    assert m.counts["fid"]["reference"] == "stored (5 images)"
    assert "ADM centre crop" in m.reference["images"]
    with pytest.raises(ValueError, match="exists"):
        make_reference_batch(tmp_path / "real", out, inception=fake, progress=False)


def test_make_ref_with_a_bad_image_writes_nothing(tmp_path, fake):
    _real_folder(tmp_path / "real")
    (tmp_path / "real" / "3.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"3\.png"):
        make_reference_batch(
            tmp_path / "real", tmp_path / "new" / "ref.npz", inception=fake, num_workers=0, progress=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real"]  # no file, no partial file, no new folder


def test_feature_cache_skips_the_inception_on_a_second_run(tmp_path, fake, no_classifier):
    np.savez(tmp_path / "s.npz", _images(9))
    _write_ref(tmp_path / "ref1.npz", images=_images(5, seed=2))
    _write_ref(tmp_path / "ref2.npz", images=_images(4, seed=3), stats=False, sstats=False)
    kw = {"inception": fake, "cache": tmp_path / "c", "progress": False}
    first = evaluate_samples(tmp_path / "s.npz", tmp_path / "ref1.npz", **kw)
    assert fake.images_seen == 9 + 5 and not first.info["samples_cache"]["features_from_cache"]
    again = evaluate_samples(tmp_path / "s.npz", tmp_path / "ref1.npz", **kw)
    assert fake.images_seen == 9 + 5  # no pass at all
    assert again.metrics == first.metrics and again.info["samples_cache"]["features_from_cache"]
    evaluate_samples(tmp_path / "s.npz", tmp_path / "ref2.npz", **kw)
    assert fake.images_seen == 9 + 5 + 4  # another reference: only its own images
    np.savez(tmp_path / "s.npz", _images(9, seed=8))  # new content under the same name
    evaluate_samples(tmp_path / "s.npz", tmp_path / "ref1.npz", **kw)
    assert fake.images_seen == 9 + 5 + 4 + 9


def test_folder_cache_key_follows_the_listing(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    for i, image in enumerate(_images(3)):
        Image.fromarray(image).save(folder / f"{i}.png")
    key = open_samples(folder).content_key()
    assert open_samples(folder).content_key() == key
    os.utime(folder / "1.png", ns=(1, 1))
    assert open_samples(folder).content_key() != key


def test_corrupt_cache_file_is_recomputed(tmp_path, fake, no_classifier):
    np.savez(tmp_path / "s.npz", _images(6))
    _write_ref(tmp_path / "ref.npz")
    kw = {"inception": fake, "cache": tmp_path / "c", "progress": False}
    evaluate_samples(tmp_path / "s.npz", tmp_path / "ref.npz", **kw)
    (cached,) = (tmp_path / "c").glob("activations-*.npz")
    cached.write_bytes(b"garbage")
    evaluate_samples(tmp_path / "s.npz", tmp_path / "ref.npz", **kw)
    assert fake.images_seen == 12 and zipfile.is_zipfile(cached)


def test_evaluate_rejects_bad_arguments(tmp_path, fake):
    np.savez(tmp_path / "one.npz", _images(1))
    _write_ref(tmp_path / "ref.npz")
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_samples(tmp_path / "one.npz", tmp_path / "ref.npz", inception=fake, cache=False, progress=False)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_samples(tmp_path / "one.npz", tmp_path / "ref.npz", inception=fake, batch_size=0)


# ----------------------------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eval_rank_worker(rank: int, world: int, port: int, root: str, queue) -> None:
    torch.set_num_threads(1)  # first: a forked child must not enter the parent's OpenMP pool
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.pop("FVQ_IS_INCEPTION_WEIGHTS", None)
    os.environ["TORCH_HOME"] = os.path.join(root, "torch-home")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fake = FakeInception()
        m = evaluate_samples(
            os.path.join(root, "s.npz"),
            os.path.join(root, "ref.npz"),
            inception=fake,
            cache=os.path.join(root, "c"),
            device="cpu",
            progress=False,
        )
        queue.put((rank, m.metrics, fake.images_seen))
    finally:
        dist.destroy_process_group()


def test_two_ranks_split_the_images_and_agree_with_one_process(tmp_path, no_classifier):
    np.savez(tmp_path / "s.npz", _images(11))
    _write_ref(tmp_path / "ref.npz", images=_images(7, seed=2))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_eval_rank_worker, args=(r, 2, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (m, seen)) for r, m, seen in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(seen for _, seen in results.values()) == [5 + 3, 6 + 4]  # disjoint slices of 11 and 7
    single = evaluate_samples(
        tmp_path / "s.npz", tmp_path / "ref.npz", inception=FakeInception(), cache=False, progress=False
    )
    for metrics, _ in results.values():
        assert metrics.keys() == single.metrics.keys()
        for key, value in single.metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-9)
    assert len(list((tmp_path / "c").glob("activations-*.npz"))) == 2  # written once each, by rank 0


def test_rank_slices_cover_every_image_once(monkeypatch):
    for n in (0, 1, 7, 10):
        slices = []
        for r in range(3):
            monkeypatch.setattr(gen.distributed, "rank", lambda r=r: r)
            monkeypatch.setattr(gen.distributed, "world_size", lambda: 3)
            slices.append(gen._rank_slice(n))
        assert [i for a, b in slices for i in range(a, b)] == list(range(n))
