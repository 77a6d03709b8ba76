"""Generation metrics against independent references: torchmetrics' Fréchet distance and Inception Score, a brute-force
numpy version of ADM's k-NN manifold estimator, and the FID of a real feature set with itself.

The real-feature test runs the FID Inception on six 64 px crops of the embedded photos (about 10 s on two CPU
cores); it is skipped when the network's weights are not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fvq.evaluation.fid import frechet_distance
from fvq.evaluation.generation import (
    Gaussian,
    evaluate_samples,
    fid_to_reference,
    frechet_to_gaussian,
    inception_score,
    load_reference,
    open_samples,
    precision_recall,
)
from fvq.evaluation.inception import (
    FEATURE_DIM,
    SPATIAL_DIM,
    InceptionFeatures,
    find_packaged_inception,
    load_inception,
)
from fvq.evaluation.inception_is import ClassifierInception

tm_fid = pytest.importorskip("torchmetrics.image.fid")
tm_inception = pytest.importorskip("torchmetrics.image.inception")


# ------------------------------------------------------------------------------------------ FID: real features


@pytest.fixture(scope="module")
def real_features():
    """Pool and spatial features of six held-out 64 px crops through the real FID Inception."""
    if find_packaged_inception() is None:
        pytest.skip("FID Inception weights not installed")
    from fvq.data.embedded import EmbeddedPhotos

    dataset = EmbeddedPhotos("val", image_size=64, val_samples=6)
    images = torch.stack([dataset[i].image for i in range(len(dataset))])  # (6, 3, 64, 64) in [-1, 1]
    with torch.inference_mode():
        out = load_inception().pool_and_spatial(images)
    return out.pool.clone(), out.spatial.clone()


def test_fid_of_real_features_with_themselves_is_zero(real_features):
    pool, spatial = real_features
    assert pool.shape == (6, FEATURE_DIM) and spatial.shape == (6, SPATIAL_DIM)
    assert torch.isfinite(pool).all() and pool.abs().sum() > 0
    g = Gaussian.of_features(pool)
    scale = float(g.sigma.trace())  # the distance's terms are of this size; rounding is relative to it
    assert scale > 0
    # The covariance of 6 vectors has rank 5: the square root of its zero eigenvalues, computed as ~eps * lambda_max,
    # is ~sqrt(eps) * lambda_max ~ 1e-8 of the trace, the error of any matrix square root here.
    tol = 1e-7 * scale
    assert abs(fid_to_reference(pool, g.mu, g.sigma)) < tol  # the N x N path that fvq takes for N = 6 < D
    gs = Gaussian.of_features(spatial)
    assert abs(frechet_to_gaussian(spatial, gs.mu, gs.sigma)) < 1e-7 * float(gs.sigma.trace())
    # and a different set is far: the first three crops against the last three
    assert fid_to_reference(pool[:3], Gaussian.of_features(pool[3:]).mu, g.sigma) > 1e-3 * scale


# ----------------------------------------------------------------------------------- FID: torchmetrics' formula


@pytest.mark.parametrize("n", [600, 40])  # full-rank sample covariance (eigh path) and N < D (N x N path)
def test_frechet_distance_equals_torchmetrics(n):
    d = 64
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
    r = rng.normal(size=(800, d)) @ rng.normal(size=(d, d)) * 0.3
    mu_r, sigma_r = torch.from_numpy(r.mean(0)), torch.from_numpy(np.cov(r, rowvar=False))
    mu_x, sigma_x = torch.from_numpy(x.mean(0)), torch.from_numpy(np.cov(x, rowvar=False))
    expected = float(tm_fid._compute_fid(mu_x, sigma_x, mu_r, sigma_r))
    assert expected > 1.0
    # torchmetrics takes the eigenvalues of the non-symmetric product sigma_x sigma_r; with a singular sigma_x
    # (N < D) their square roots carry ~sqrt(eps) errors, hence 1e-7 rather than float64 rounding
    rel = 1e-10 if n > d else 1e-7
    assert frechet_distance(mu_x, sigma_x, mu_r, sigma_r) == pytest.approx(expected, rel=rel)
    assert frechet_to_gaussian(torch.from_numpy(x), mu_r, sigma_r) == pytest.approx(expected, rel=rel)
    # the fvq Gaussian of the features is torchmetrics' input
    g = Gaussian.of_features(torch.from_numpy(x))
    assert torch.allclose(g.mu, mu_x, rtol=0, atol=1e-12) and torch.allclose(g.sigma, sigma_x, rtol=0, atol=1e-10)


# ------------------------------------------------------------------- precision / recall: ADM's ManifoldEstimator


def _adm_manifold_estimator(ref: np.ndarray, smp: np.ndarray, k: int = 3) -> tuple[float, float]:
    """ADM's ``ManifoldEstimator`` in plain numpy, without blocks: radii = the (k+1)-th smallest entry of each row of
    a set's self-distance matrix (``np.partition``); a vector is inside a manifold when some manifold vector's radius
    is at least their squared distance; precision over samples, recall over reference vectors."""

    def sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :], 0)

    def radii(x: np.ndarray) -> np.ndarray:
        return np.partition(sq(x, x), k, axis=1)[:, k]

    r_ref, r_smp = radii(ref), radii(smp)
    d = sq(ref, smp)  # (N_ref, N_smp)
    precision = (d <= r_ref[:, None]).any(axis=0).mean()  # samples within some reference radius
    recall = (d <= r_smp[None, :]).any(axis=1).mean()  # reference vectors within some sample radius
    return float(precision), float(recall)


def test_precision_recall_identical_and_disjoint_sets_match_the_numpy_estimator():
    rng = np.random.default_rng(11)
    ref = rng.normal(size=(120, 32))
    assert _adm_manifold_estimator(ref, ref.copy()) == (1.0, 1.0)
    pr = precision_recall(torch.from_numpy(ref).float(), torch.from_numpy(ref).float(), device="cpu")
    assert (pr.precision, pr.recall) == (1.0, 1.0)
    far = rng.normal(size=(90, 32)) + 1e3
    assert _adm_manifold_estimator(ref, far) == (0.0, 0.0)
    pr = precision_recall(torch.from_numpy(ref).float(), torch.from_numpy(far).float(), device="cpu")
    assert (pr.precision, pr.recall) == (0.0, 0.0)


@pytest.mark.parametrize("shift", [0.0, 0.5, 1.5, 3.0])
def test_precision_recall_overlapping_sets_match_the_numpy_estimator(shift):
    rng = np.random.default_rng(12)
    ref = rng.normal(size=(150, 16))
    smp = rng.normal(size=(110, 16)) * 0.8 + shift / 4  # partly overlapping: both figures strictly inside (0, 1)
    smp[:, 0] += shift
    expected = _adm_manifold_estimator(ref, smp)
    pr = precision_recall(
        torch.from_numpy(ref).float(), torch.from_numpy(smp).float(), row_batch_size=64, col_batch_size=48
    )
    # float32 distances: a verdict can only flip for a point within ~1e-6 of a radius, which these sets have not
    assert (pr.precision, pr.recall) == pytest.approx(expected, abs=1.5 / 110)


# ------------------------------------------------------------------------------------ IS: torchmetrics' formula


class _Identity(torch.nn.Module):
    """A torchmetrics feature extractor that returns its input: the "images" given to update() are the logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchmetrics_is(logits: torch.Tensor) -> float:
    metric = tm_inception.InceptionScore(feature=_Identity(), splits=1)
    metric.update(logits)
    mean, _ = metric.compute()  # one split: the random permutation torchmetrics applies cannot change it
    return float(mean)


def test_inception_score_of_uniform_and_one_hot_logits():
    uniform = torch.zeros(64, 1008, dtype=torch.float64)
    assert inception_score(uniform, split_size=64).mean == pytest.approx(1.0, abs=1e-12)
    assert _torchmetrics_is(uniform) == pytest.approx(1.0, abs=1e-12)
    for c in (1, 7, 50):
        labels = np.arange(c * 6) % c  # 6 samples of each of c classes
        logits = torch.from_numpy(np.eye(c)[labels] * 100.0)
        ours = inception_score(logits, split_size=len(labels)).mean
        assert ours == pytest.approx(c, rel=1e-9)
        assert ours == pytest.approx(_torchmetrics_is(logits), rel=1e-9)


def test_inception_score_equals_torchmetrics_on_random_logits():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 1008, generator=g, dtype=torch.float64) * 4
    ours = inception_score(logits, split_size=300).mean
    assert 1.5 < ours < 300
    assert ours == pytest.approx(_torchmetrics_is(logits), rel=1e-9)
    # float32 logits, as the classifier returns them
    assert inception_score(logits.float(), split_size=300).mean == pytest.approx(ours, rel=1e-5)


def test_inception_score_does_not_depend_on_the_sample_order():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(400, 1008, generator=g) * 3
    perm = torch.randperm(400, generator=g)
    # one split: exactly (up to summation order)
    one = inception_score(logits, split_size=400)
    assert inception_score(logits[perm], split_size=400).mean == pytest.approx(one.mean, rel=1e-12)
    # several splits: the assignment to splits changes with the order, the figure only by the split noise
    many = inception_score(logits, split_size=100).mean
    assert inception_score(logits[perm], split_size=100).mean == pytest.approx(many, rel=0.02)


# --------------------------------------------------------------------------------------- ADM's .npz layout


def _adm_images(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (9, 12, 10, 3), dtype=np.uint8)


@pytest.mark.parametrize("compressed", [False, True])
def test_adm_sample_npz_round_trips(tmp_path, compressed):
    """Samples saved as ADM's sampling script saves them (arr_0 images, arr_1 labels) are read back bit for bit."""
    save = np.savez_compressed if compressed else np.savez
    rng = np.random.default_rng(5)
    images = _adm_images(rng)
    labels = rng.integers(0, 1000, 9)
    save(tmp_path / "samples.npz", images, labels)
    s = open_samples(tmp_path / "samples.npz")
    assert (s.num_images, s.image_size, s.kind) == (9, (12, 10), "npz")
    assert np.array_equal(s.labels, labels) and s.labels_source == "arr_1 of samples.npz"
    got = torch.cat(list(s.batches(0, 9, batch_size=4))).permute(0, 2, 3, 1).numpy()  # (9, 12, 10, 3)
    assert got.dtype == np.uint8 and np.array_equal(got, images)
    assert np.array_equal(torch.cat(list(s.batches(3, 8, batch_size=2))).permute(0, 2, 3, 1).numpy(), images[3:8])


def test_adm_reference_npz_round_trips(tmp_path):
    """A reference batch in ADM's layout (arr_0 images, float64 mu/sigma/mu_s/sigma_s) is read back bit for bit."""
    rng = np.random.default_rng(6)
    images = _adm_images(rng)
    pool = rng.normal(size=(30, FEATURE_DIM))
    spatial = rng.normal(size=(30, SPATIAL_DIM))
    stats = {
        "mu": pool.mean(0),
        "sigma": np.cov(pool, rowvar=False),
        "mu_s": spatial.mean(0),
        "sigma_s": np.cov(spatial, rowvar=False),
    }
    np.savez(tmp_path / "ref.npz", images, **stats)
    ref = load_reference(tmp_path / "ref.npz", cache=False)
    assert (ref.content, ref.num_images, ref.image_size) == ("images", 9, (12, 10))
    for got_stats, mu, sigma in ((ref.fid, "mu", "sigma"), (ref.sfid, "mu_s", "sigma_s")):
        assert got_stats is not None
        assert np.array_equal(got_stats.mu.numpy(), stats[mu]) and np.array_equal(got_stats.sigma.numpy(), stats[sigma])


# ------------------------------------------------------------------------------------------------- bad input


class _FakeInception(torch.nn.Module):
    """The FID Inception's interface at no cost: features are fixed random projections of 8x8 thumbnails."""

    protocol = "fake-inception|references"

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w_pool", torch.randn(192, FEATURE_DIM, generator=g) / 8)
        self.register_buffer("w_spatial", torch.randn(192, SPATIAL_DIM, generator=g) / 8)

    def preprocess(self, images: torch.Tensor, *, value_range=(-1.0, 1.0)) -> torch.Tensor:
        return torch.nn.functional.interpolate(images.float() / 127.5 - 1, size=(75, 75), mode="bilinear")

    def run_network(self, x: torch.Tensor) -> InceptionFeatures:
        f = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)  # (B, 192)
        return InceptionFeatures(pool=(f @ self.w_pool).relu(), spatial=f @ self.w_spatial)


@pytest.fixture
def no_classifier(monkeypatch, tmp_path):
    monkeypatch.delenv("FVQ_IS_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def _rgb(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_grayscale_and_rgba_files_are_converted_counted_and_stated(tmp_path, no_classifier):
    folder = tmp_path / "samples"
    folder.mkdir()
    images = _rgb(6)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    Image.fromarray(images[1, ..., 0]).save(folder / "1.png")  # grayscale (L)
    rgba = np.concatenate([images[2], np.full((16, 16, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba).save(folder / "2.png")  # opaque RGBA
    Image.fromarray(np.concatenate([images[3], np.zeros((16, 16, 1), np.uint8)], axis=2)).save(folder / "3.png")
    np.savez(tmp_path / "ref.npz", _rgb(5, seed=1))  # a reference of images only
    m = evaluate_samples(folder, tmp_path / "ref.npz", inception=_FakeInception(), cache=False, progress=False)
    assert m.samples["converted_to_rgb"] == {"L": 1, "RGBA": 2}
    assert any("3 of 6 sample files are not RGB (L: 1, RGBA: 2)" in note for note in m.notes)
    got = torch.cat(list(open_samples(folder).batches(0, 6))).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got[1], np.repeat(images[1, ..., :1], 3, axis=2))  # grayscale replicated
    assert np.array_equal(got[2], images[2])  # opaque alpha dropped
    assert (got[3] == 255).all()  # fully transparent: white
    # an all-RGB folder states nothing
    for i in (1, 2, 3):
        Image.fromarray(images[i]).save(folder / f"{i}.png")
    m = evaluate_samples(folder, tmp_path / "ref.npz", inception=_FakeInception(), cache=False, progress=False)
    assert m.samples["converted_to_rgb"] is None and not any("not RGB" in note for note in m.notes)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (_rgb(3)[..., :1], "N x H x W x 3"),  # grayscale with a channel axis
        (np.concatenate([_rgb(3), _rgb(3)[..., :1]], axis=3), "N x H x W x 3"),  # RGBA
        (_rgb(3).astype(np.float64) / 255, "must be uint8"),
        (_rgb(3).astype(np.int64), "must be uint8"),
    ],
)
def test_npz_samples_and_references_of_other_layouts_are_refused(tmp_path, array, message):
    np.savez(tmp_path / "bad.npz", array)
    with pytest.raises(ValueError, match=message):
        open_samples(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match=message):
        load_reference(tmp_path / "bad.npz", cache=False)


def test_reference_without_statistics(tmp_path, no_classifier):
    np.savez(tmp_path / "s.npz", _rgb(8, seed=2))
    np.savez(tmp_path / "ref.npz", _rgb(5, seed=1))  # images, no mu/sigma/mu_s/sigma_s: computed from them, stated
    m = evaluate_samples(
        tmp_path / "s.npz", tmp_path / "ref.npz", inception=_FakeInception(), cache=False, progress=False
    )
    assert "computed from the 5 arr_0 images" in m.reference["fid_statistics"]
    assert "computed from the 5 arr_0 images" in m.reference["sfid_statistics"]
    assert m.counts["fid"]["reference"] == 5 and m.counts["sfid"]["reference"] == 5
    np.savez(tmp_path / "feat.npz", np.zeros((5, FEATURE_DIM), np.float32))  # features only, no statistics
    with pytest.raises(ValueError, match="holds neither stored mu/sigma nor arr_0 images"):
        load_reference(tmp_path / "feat.npz", cache=False)


def test_fewer_samples_than_the_is_split_are_one_stated_split(tmp_path, monkeypatch):
    torch.manual_seed(0)
    classifier = ClassifierInception()
    for p in classifier.parameters():
        p.data.normal_(0, 0.05)
    np.savez(tmp_path / "s.npz", _rgb(6, seed=2))
    np.savez(tmp_path / "ref.npz", _rgb(5, seed=1))
    kw = {"inception": _FakeInception(), "classifier": classifier, "cache": False, "progress": False}
    m = evaluate_samples(tmp_path / "s.npz", tmp_path / "ref.npz", is_split_size=10, **kw)
    assert m.counts["inception_score"]["samples"] == 6 and m.metrics["inception_score_std"] == 0.0
    assert any("6 samples are fewer than the split size 10; they form one split of 6" in n for n in m.notes)
    m = evaluate_samples(tmp_path / "s.npz", tmp_path / "ref.npz", is_split_size=4, **kw)
    assert any("the last split holds 2 samples" in n for n in m.notes)
    assert not any("fewer than the split size" in n for n in m.notes)
