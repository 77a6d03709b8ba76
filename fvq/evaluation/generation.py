"""Generation metrics as the ADM evaluator computes them: FID, sFID, Inception Score, precision and recall.

The protocol is that of ``evaluations/evaluator.py`` in openai/guided-diffusion (Dhariwal & Nichol 2021,
https://arxiv.org/abs/2105.05233), the evaluator LlamaGen, FVQ and most class-conditional ImageNet papers report:

* **FID**: Fréchet distance between the Gaussian of the samples' ``pool_3`` features (mean and unbiased covariance,
  float64) and the reference batch's **stored** ``mu`` / ``sigma``. Stored statistics are never recomputed.
* **sFID**: the same distance on the spatial features ``mixed_6/conv`` (first 7 channels, 17 x 17 x 7 = 2,023
  values in TensorFlow's (H, W, C) order) against the stored ``mu_s`` / ``sigma_s``.
* **Inception Score**: ``exp(E_x KL(p(y|x) || p(y)))`` with ``p(y|x)`` the softmax over all 1,008 logits of the
  Inception classifier (``pool_3 @ W`` without bias, as ADM), in splits of 5,000 samples, reported as the mean over
  splits (the last split holds what remains). ADM splits the samples in file order; fvq first shuffles them with
  a fixed seed (``np.random.RandomState(seed).permutation``), because class-sorted files give a far lower score
  (each split then sees few classes). ``seed=None`` keeps ADM's file order.
* **Precision / recall** (Kynkäänniemi et al. 2019, https://arxiv.org/abs/1904.06991, as ADM's
  ``ManifoldEstimator``): every feature vector of a set gets a radius, the squared distance to its k-th nearest
  neighbour in its own set (k = 3; the point itself counts as the 0th); precision is the fraction of samples within
  the radius of at least one reference vector, recall the fraction of reference vectors within the radius of at
  least one sample. All reference vectors (``arr_0`` of the reference batch, 10,000 images for ADM's ImageNet
  batches) and all samples are used; distances in blocks of 10,000 x 10,000. ADM computes the squared distances in
  float16 (float32 when a block overflows); fvq in float32, which changes the verdict only for points within about
  1e-3 (relative) of a radius.

Features come from the FID Inception of :mod:`fvq.evaluation.inception` (the same TF graph and preprocessing as ADM:
8-bit images, TF1 bilinear resize to 299, ``(u - 128) / 128``). The IS classifier is read from pytorch-fid's weight
file (:mod:`fvq.evaluation.inception_is`); without it the IS is reported as unavailable, with the reason.

Files:

* samples: an ADM-layout ``.npz`` (``arr_0``: uint8 ``N x H x W x 3``; optional ``arr_1`` / ``labels`` class labels)
  or a folder of image files (sorted paths), read in batches (an ``.npz`` stored uncompressed is memory-mapped), so
  50,000 images are never in memory at once; only features are kept.
* reference batch: an ``.npz`` with ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` and ``arr_0`` (images, or ``N x 2048``
  pool features) for precision / recall. :func:`make_reference_batch` writes one from a folder of real images.

Under ``torch.distributed`` every rank computes the features of a disjoint contiguous slice; the slices are gathered
in order, rank 0 computes the figures and shares them. Features are cached by the content of the set (the sha256 of
an ``.npz``; the listing with sizes and modification times of a folder) and the Inception protocol, so scoring the
same samples against another reference runs no second Inception pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fvq import distributed
from fvq.data.folder import scan_images
from fvq.data.images import decode_image
from fvq.data.transforms import center_crop_llamagen
from fvq.evaluation.fid import frechet_distance
from fvq.evaluation.inception import (
    FEATURE_DIM,
    SPATIAL_CHANNELS,
    SPATIAL_DIM,
    SPATIAL_LAYER,
    FIDInception,
    load_inception,
)
from fvq.evaluation.inception_is import (
    NUM_CLASSES,
    ClassifierInception,
    find_classifier_weights,
    load_classifier_inception,
    shares_trunk,
)
from fvq.evaluation.metrics import ValueRange
from fvq.weights import cache_dir as fvq_cache_dir
from fvq.weights import sha256_file

__all__ = [
    "IS_SEED",
    "IS_SPLIT_SIZE",
    "PR_BATCH_SIZE",
    "PR_K",
    "Activations",
    "Gaussian",
    "GenerationMetrics",
    "InceptionScore",
    "NpzArrayReader",
    "PrecisionRecall",
    "ReferenceBatch",
    "SampleSet",
    "class_balance",
    "compute_activations",
    "evaluate_samples",
    "fid_to_reference",
    "file_sha256",
    "frechet_to_gaussian",
    "inception_score",
    "load_reference",
    "make_reference_batch",
    "manifold_radii",
    "open_samples",
    "precision_recall",
    "sfid_to_reference",
]

IS_SPLIT_SIZE = 5000
"""Samples per Inception Score split (ADM)."""
IS_SEED = 0
"""Seed of the shuffle before the IS splits (``None`` keeps the file order, as ADM)."""
PR_K = 3
"""Neighbourhood size of the precision / recall manifolds (ADM)."""
PR_BATCH_SIZE = 10000
"""Row and column block size of the pairwise distances (ADM's ``row_batch_size`` / ``col_batch_size``)."""
ADM_NUM_SAMPLES = 50000

ACTIVATIONS_FORMAT = "fvq-gen-activations-v1"
REFERENCE_FORMAT = "fvq-reference-batch-v1"
SAMPLE_CONFIG = "sample_config.json"
SPATIAL_SPEC = f"{SPATIAL_LAYER}[:{SPATIAL_CHANNELS}] flattened (H, W, C)"
ADM_CROP = (
    "ADM centre crop: BOX halving while the short side is at least 2 S, bicubic resize of the short side to S, "
    "centre crop S x S"
)


# ----------------------------------------------------------------------------------------------------------------
# results


@dataclass
class Activations:
    """Inception features of a set of images, in the set's order.

    Attributes:
        pool: ``(N, 2048)`` float32 ``pool_3`` features.
        spatial: ``(N, 2023)`` float32 ``mixed_6/conv`` features (first 7 channels, (H, W, C) order).
        logits: ``(N, 1008)`` float32 classifier logits without bias, or ``None`` without a classifier.
    """

    pool: Tensor
    spatial: Tensor
    logits: Tensor | None = None

    def __len__(self) -> int:
        return int(self.pool.shape[0])


@dataclass
class Gaussian:
    """Mean and covariance of a feature set (float64).

    Attributes:
        mu: ``(D,)`` mean.
        sigma: ``(D, D)`` unbiased covariance.
        source: Where they come from, in words.
    """

    mu: Tensor
    sigma: Tensor
    source: str = ""

    @classmethod
    def of_features(cls, features: Tensor, *, source: str = "", chunk_size: int = 8192) -> Gaussian:
        """Mean and unbiased covariance of ``(N, D)`` features (``np.mean`` / ``np.cov(rowvar=False)`` as ADM).

        Computed in float64 in two passes over row chunks (centred sums), so memory stays ``O(D^2 + chunk D)``.
        """
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"need (N, D) features with N >= 2 for a covariance, got {tuple(features.shape)}")
        n, d = features.shape
        device = features.device
        mu = torch.zeros(d, dtype=torch.float64, device=device)
        for chunk in features.split(chunk_size):
            mu += chunk.to(torch.float64).sum(0)
        mu /= n
        sigma = torch.zeros(d, d, dtype=torch.float64, device=device)
        for chunk in features.split(chunk_size):
            c = chunk.to(torch.float64) - mu  # (B, D)
            sigma += c.T @ c
        sigma /= n - 1
        return cls(mu=mu.cpu(), sigma=((sigma + sigma.T) / 2).cpu(), source=source)


@dataclass
class PrecisionRecall:
    """Improved precision and recall (k-NN manifolds).

    Attributes:
        precision: Fraction of samples inside the reference manifold.
        recall: Fraction of reference vectors inside the sample manifold.
        k: Neighbourhood size.
        num_reference: Reference vectors used.
        num_samples: Sample vectors used.
    """

    precision: float
    recall: float
    k: int
    num_reference: int
    num_samples: int


@dataclass
class InceptionScore:
    """Inception Score over splits.

    Attributes:
        mean: Mean of the per-split scores (the reported figure, as ADM).
        std: Population standard deviation of the per-split scores.
        splits: Per-split scores.
        split_size: Samples per split (the last split holds what remains).
        num_samples: Samples scored.
        seed: Seed of the shuffle before splitting (``None``: file order).
    """

    mean: float
    std: float
    splits: list[float]
    split_size: int
    num_samples: int
    seed: int | None


# ----------------------------------------------------------------------------------------------------------------
# the metrics on features


def _check_gaussian(mu: Tensor | np.ndarray, sigma: Tensor | np.ndarray, dim: int, what: str) -> None:
    if tuple(mu.shape) != (dim,) or tuple(sigma.shape) != (dim, dim):
        raise ValueError(
            f"{what}: expected mu ({dim},) and sigma ({dim}, {dim}), got {tuple(mu.shape)} and {tuple(sigma.shape)}"
        )


def frechet_to_gaussian(features: Tensor, mu: Tensor | np.ndarray, sigma: Tensor | np.ndarray) -> float:
    """Fréchet distance between the Gaussian of ``(N, D)`` features and ``N(mu, sigma)``, in float64.

    The features' mean and unbiased covariance are those of :meth:`Gaussian.of_features`. With N >= D + 1 the
    distance is :func:`~fvq.evaluation.fid.frechet_distance` of the two Gaussians. With fewer features the
    covariance is ``A^T A`` (``A`` = centred features over ``sqrt(N - 1)``) and ``tr((A^T A S)^{1/2})`` is the sum
    of the square roots of the eigenvalues of the ``N x N`` matrix ``A S A^T`` (same nonzero eigenvalues): exact,
    and no ``D x D`` eigendecomposition.
    """
    mu_t = torch.as_tensor(np.asarray(mu) if not isinstance(mu, Tensor) else mu).to(torch.float64).cpu()
    sigma_t = torch.as_tensor(np.asarray(sigma) if not isinstance(sigma, Tensor) else sigma).to(torch.float64).cpu()
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N, D) features with N >= 2 for a covariance, got {tuple(features.shape)}")
    n, d = features.shape
    _check_gaussian(mu_t, sigma_t, d, "reference statistics")
    if n > d:
        g = Gaussian.of_features(features)
        return frechet_distance(g.mu, g.sigma, mu_t, sigma_t)
    x = features.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("features have non-finite values")
    mean = x.mean(0)
    a = (x - mean) / math.sqrt(n - 1)  # (N, D)
    s = (sigma_t + sigma_t.T) / 2
    m = a @ s @ a.T  # (N, N)
    trace_sqrt = float(torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0.0).sqrt().sum())
    diff = mean - mu_t
    return float(diff @ diff + a.square().sum() + s.trace()) - 2.0 * trace_sqrt


def fid_to_reference(pool: Tensor, mu: Tensor | np.ndarray, sigma: Tensor | np.ndarray) -> float:
    """FID of ``(N, 2048)`` pool features against a reference's ``mu`` ``(2048,)`` and ``sigma`` ``(2048, 2048)``.

    The samples' mean and unbiased covariance are computed in float64; the reference statistics are used as given
    (:func:`frechet_to_gaussian`).
    """
    _check_gaussian(mu, sigma, FEATURE_DIM, "FID reference statistics")
    if pool.ndim != 2 or pool.shape[1] != FEATURE_DIM or pool.shape[0] < 2:
        raise ValueError(f"pool features must have shape (N >= 2, {FEATURE_DIM}), got {tuple(pool.shape)}")
    return frechet_to_gaussian(pool, mu, sigma)


def sfid_to_reference(spatial: Tensor, mu_s: Tensor | np.ndarray, sigma_s: Tensor | np.ndarray) -> float:
    """sFID of ``(N, 2023)`` spatial features against a reference's ``mu_s`` ``(2023,)`` and ``sigma_s``."""
    _check_gaussian(mu_s, sigma_s, SPATIAL_DIM, "sFID reference statistics")
    if spatial.ndim != 2 or spatial.shape[1] != SPATIAL_DIM or spatial.shape[0] < 2:
        raise ValueError(f"spatial features must have shape (N >= 2, {SPATIAL_DIM}), got {tuple(spatial.shape)}")
    return frechet_to_gaussian(spatial, mu_s, sigma_s)


def inception_score(logits: Tensor, *, split_size: int = IS_SPLIT_SIZE, seed: int | None = IS_SEED) -> InceptionScore:
    """Inception Score of ``(N, C)`` classifier logits (C = 1,008 for the Inception classifier).

    Per split: ``exp(mean_i sum_c p_ic (log p_ic - log mean_j p_jc))`` with ``p`` the softmax over all C logits,
    computed in float64 from ``log_softmax`` (no ``0 * log 0``). Splits of ``split_size`` consecutive samples after
    the shuffle; the result is the mean over splits (ADM).

    Args:
        logits: ``(N, C)`` logits, N >= 1.
        split_size: Samples per split (ADM: 5,000).
        seed: Shuffle with ``np.random.RandomState(seed).permutation(N)`` first; ``None`` keeps the order (ADM).
    """
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"logits must have shape (N, C) with N >= 1, got {tuple(logits.shape)}")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1, got {split_size}")
    x = logits.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("logits have non-finite values")
    n = x.shape[0]
    if seed is not None:
        x = x[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    scores = []
    for start in range(0, n, split_size):
        log_p = torch.log_softmax(x[start : start + split_size], dim=1)  # (S, C)
        log_marginal = torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])  # (C,) log of the mean p(y)
        kl = (log_p.exp() * (log_p - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    s = np.asarray(scores)
    return InceptionScore(float(s.mean()), float(s.std()), scores, split_size, n, seed)


@contextmanager
def _exact_float32() -> Iterator[None]:
    """Switch TF32 matrix products off (a global CUDA flag) while distances are computed."""
    cuda = torch.backends.cuda.matmul
    previous = cuda.allow_tf32
    cuda.allow_tf32 = False
    try:
        yield
    finally:
        cuda.allow_tf32 = previous


def _squared_distances(u: Tensor, v: Tensor) -> Tensor:
    """``(R, D)``, ``(C, D)`` -> ``(R, C)`` squared Euclidean distances ``max(|u|^2 - 2 u.v + |v|^2, 0)`` (ADM)."""
    nu = u.square().sum(1, keepdim=True)  # (R, 1)
    nv = v.square().sum(1).unsqueeze(0)  # (1, C)
    return (nu - 2.0 * (u @ v.T) + nv).clamp_min_(0.0)


def _check_pr_inputs(features: Tensor, name: str, k: int) -> Tensor:
    if features.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(features.shape)}")
    if features.shape[0] <= k:
        raise ValueError(f"{name}: a k = {k} manifold needs more than {k} vectors, got {features.shape[0]}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} has non-finite values")
    return features.detach().to(torch.float32)


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def manifold_radii(
    features: Tensor,
    *,
    k: int = PR_K,
    row_batch_size: int = PR_BATCH_SIZE,
    col_batch_size: int = PR_BATCH_SIZE,
    device: torch.device | str | None = None,
) -> Tensor:
    """Squared distance of each vector to its k-th nearest neighbour in its own set (the vector itself is the 0th).

    As ADM's ``ManifoldEstimator.manifold_radii``: the (k+1)-th smallest entry of each row of the set's
    self-distance matrix. Rows and columns are processed in blocks (a running top-(k+1) over column blocks), so
    memory stays ``row_batch_size x col_batch_size``.

    Args:
        features: ``(N, D)`` features, N > k.
        k: Neighbourhood size.
        row_batch_size: Rows per block.
        col_batch_size: Columns per block.
        device: Where distances are computed (default: CUDA when available).

    Returns:
        ``(N,)`` float32 radii on the CPU.
    """
    feats = _check_pr_inputs(features, "features", k)
    dev = _device(device)
    radii = torch.empty(feats.shape[0], dtype=torch.float32)
    with _exact_float32():
        for r0 in range(0, feats.shape[0], row_batch_size):
            rows = feats[r0 : r0 + row_batch_size].to(dev)
            best: Tensor | None = None  # (R, <= k+1) smallest distances so far, ascending
            for c0 in range(0, feats.shape[0], col_batch_size):
                d = _squared_distances(rows, feats[c0 : c0 + col_batch_size].to(dev))  # (R, C)
                cand = d if best is None else torch.cat([best, d], dim=1)
                best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False, sorted=True).values
            assert best is not None
            radii[r0 : r0 + rows.shape[0]] = best[:, k].cpu()
    return radii


@torch.no_grad()
def precision_recall(
    reference: Tensor,
    samples: Tensor,
    *,
    k: int = PR_K,
    row_batch_size: int = PR_BATCH_SIZE,
    col_batch_size: int = PR_BATCH_SIZE,
    device: torch.device | str | None = None,
) -> PrecisionRecall:
    """Improved precision and recall of ``samples`` against ``reference`` (ADM's ``compute_prec_recall``).

    Args:
        reference: ``(N1, D)`` reference pool features (ADM: all of the reference batch's ``arr_0``), N1 > k.
        samples: ``(N2, D)`` sample pool features (ADM: all samples), N2 > k.
        k: Neighbourhood size.
        row_batch_size: Reference rows per distance block.
        col_batch_size: Sample columns per distance block.
        device: Where distances are computed (default: CUDA when available).

    Returns:
        :class:`PrecisionRecall`: precision = fraction of samples within some reference radius, recall = fraction of
        reference vectors within some sample radius (``distance <= radius``, both squared).
    """
    ref = _check_pr_inputs(reference, "reference", k)
    smp = _check_pr_inputs(samples, "samples", k)
    if ref.shape[1] != smp.shape[1]:
        raise ValueError(f"feature dimensions differ: reference {ref.shape[1]}, samples {smp.shape[1]}")
    dev = _device(device)
    kw = {"k": k, "row_batch_size": row_batch_size, "col_batch_size": col_batch_size, "device": dev}
    ref_radii, smp_radii = manifold_radii(ref, **kw), manifold_radii(smp, **kw)
    ref_inside = torch.zeros(ref.shape[0], dtype=torch.bool)  # reference vector inside the sample manifold
    smp_inside = torch.zeros(smp.shape[0], dtype=torch.bool)  # sample inside the reference manifold
    with _exact_float32():
        for r0 in range(0, ref.shape[0], row_batch_size):
            rows = ref[r0 : r0 + row_batch_size].to(dev)
            r_radii = ref_radii[r0 : r0 + row_batch_size].to(dev)
            for c0 in range(0, smp.shape[0], col_batch_size):
                cols = smp[c0 : c0 + col_batch_size].to(dev)
                d = _squared_distances(rows, cols)  # (R, C)
                c_radii = smp_radii[c0 : c0 + col_batch_size].to(dev)
                ref_inside[r0 : r0 + rows.shape[0]] |= (d <= c_radii.unsqueeze(0)).any(1).cpu()
                smp_inside[c0 : c0 + cols.shape[0]] |= (d <= r_radii.unsqueeze(1)).any(0).cpu()
    return PrecisionRecall(
        precision=float(smp_inside.double().mean()),
        recall=float(ref_inside.double().mean()),
        k=k,
        num_reference=int(ref.shape[0]),
        num_samples=int(smp.shape[0]),
    )


# ----------------------------------------------------------------------------------------------------------------
# reading .npz arrays and image folders


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


class NpzArrayReader:
    """One array of an ``.npz`` file, read by row ranges without loading the whole array.

    An array stored uncompressed (``np.savez``) is memory-mapped; a compressed one (``np.savez_compressed``) is
    decompressed as a stream (reading rows ``a:b`` decompresses everything before ``b``).

    Args:
        path: The ``.npz`` file.
        name: The array's name (``"arr_0"``).

    Attributes:
        shape: The array's shape.
        dtype: Its dtype.
        compressed: Whether it is stored compressed.
    """

    def __init__(self, path: str | os.PathLike, name: str = "arr_0") -> None:
        self.path = Path(path)
        self.name = name
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        try:
            zf = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile as err:
            raise ValueError(f"{self.path} is not an .npz file (not a zip archive: {err})") from None
        with zf:
            member = f"{name}.npy"
            if member not in zf.namelist():
                arrays = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
                raise ValueError(f"{self.path} has no array {name!r} (it holds {arrays})")
            self._info = zf.getinfo(member)
            with zf.open(self._info) as f:
                try:
                    shape, fortran, dtype = _read_npy_header(f)
                except ValueError as err:
                    raise ValueError(f"{self.path}: array {name!r} is not a readable .npy ({err})") from None
                self._header_len = f.tell()
        if fortran and len(shape) > 1:
            raise ValueError(f"{self.path}: array {name!r} is stored in Fortran order; save it with np.savez (C order)")
        if dtype.hasobject:
            raise ValueError(f"{self.path}: array {name!r} holds Python objects; fvq reads only plain arrays")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype
        self.compressed = self._info.compress_type != zipfile.ZIP_STORED
        self._memmap: np.ndarray | None = None
        self._stream = None
        self._stream_zip: zipfile.ZipFile | None = None
        self._stream_pos = 0

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def _data_offset(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self._info.header_offset)
            local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise ValueError(f"{self.path}: corrupt zip entry for {self.name!r}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return self._info.header_offset + 30 + name_len + extra_len + self._header_len

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a new array."""
        n = self.shape[0] if self.shape else 0
        start, stop = max(0, start), min(stop, n)
        if stop <= start:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        if not self.compressed:
            if self._memmap is None:
                self._memmap = np.memmap(
                    self.path, dtype=self.dtype, mode="r", offset=self._data_offset(), shape=self.shape
                )
            return np.array(self._memmap[start:stop])
        if self._stream is None or start < self._stream_pos:
            self._close_stream()
            self._stream_zip = zipfile.ZipFile(self.path)
            self._stream = self._stream_zip.open(self._info)
            self._stream.read(self._header_len)
            self._stream_pos = 0
        skip = (start - self._stream_pos) * self.row_bytes
        while skip > 0:
            got = len(self._stream.read(min(skip, 1 << 24)))
            if got == 0:
                raise ValueError(f"{self.path}: array {self.name!r} ends early")
            skip -= got
        want = (stop - start) * self.row_bytes
        data = self._stream.read(want)
        if len(data) != want:
            raise ValueError(f"{self.path}: array {self.name!r} ends early ({len(data)} of {want} bytes)")
        self._stream_pos = stop
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, *self.shape[1:]).copy()

    def read_all(self) -> np.ndarray:
        """The whole array (only for small arrays: statistics, labels, feature matrices)."""
        return self.read(0, self.shape[0]) if self.shape else np.load(self.path)[self.name]

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._stream_zip is not None:
            self._stream_zip.close()
        self._stream, self._stream_zip = None, None

    def close(self) -> None:
        self._close_stream()
        self._memmap = None

    def __enter__(self) -> NpzArrayReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _npz_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not an .npz file (not a zip archive: {err})") from None


def _small_array(path: Path, name: str) -> np.ndarray:
    with NpzArrayReader(path, name) as reader:
        return reader.read_all()


def _check_image_array(reader: NpzArrayReader, what: str) -> None:
    shape, dtype = reader.shape, reader.dtype
    if len(shape) != 4 or shape[3] != 3:
        raise ValueError(
            f"{what}: arr_0 must hold images as N x H x W x 3 (channels last, ADM layout), got shape {shape}"
        )
    if dtype != np.uint8:
        raise ValueError(
            f"{what}: arr_0 must be uint8 images in [0, 255], got dtype {dtype}; convert float images in [0, 1] with "
            "(x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    if shape[0] < 1:
        raise ValueError(f"{what}: arr_0 holds no images")


class _ImageFiles(Dataset):
    """Image files decoded to ``(3, H, W)`` uint8 tensors, optionally ADM-centre-cropped to ``crop`` x ``crop``.

    A file that cannot be decoded yields its error message instead of a tensor, so that the main process raises it
    with the file's name (an exception raised in a loader worker arrives wrapped in the worker's traceback).
    """

    def __init__(self, files: list[str], crop: int | None = None) -> None:
        self.files, self.crop = files, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor | str:
        try:
            image = decode_image(self.files[index]).image
        except ValueError as err:
            return str(err)
        if self.crop is not None:
            image = center_crop_llamagen(image, self.crop)
        array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)


def _as_list(items: list[Tensor | str]) -> list[Tensor | str]:
    return items


def _image_batches(
    files: list[str], size: tuple[int, int], *, crop: int | None, batch_size: int, num_workers: int
) -> Iterator[Tensor]:
    """``(B, 3, H, W)`` uint8 batches of ``files`` in order; a file that cannot be decoded or whose size is not
    ``size`` stops the iteration with a ``ValueError`` naming it."""
    loader = DataLoader(
        _ImageFiles(files, crop=crop), batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list
    )
    done = 0
    for items in loader:
        for i, item in enumerate(items):
            if isinstance(item, str):
                raise ValueError(item)
            if tuple(item.shape[1:]) != size:
                h, w = item.shape[1:]
                raise ValueError(
                    f"{files[done + i]} is {h}x{w} but the samples are {size[0]}x{size[1]} (like {files[0]}); every "
                    "sample of a set must have one size"
                )
        done += len(items)
        yield torch.stack(items)  # (B, 3, H, W)


@dataclass
class SampleSet:
    """A set of images on disk, read in batches: an ADM-layout ``.npz`` (``arr_0``) or a folder of image files.

    Build it with :func:`open_samples`.

    Attributes:
        path: The ``.npz`` file or the folder.
        kind: ``"npz"`` or ``"folder"``.
        num_images: N.
        image_size: ``(H, W)`` of every image (a folder's first image; every other one is checked when read).
        files: The folder's image files, sorted (empty for an ``.npz``).
        labels: ``(N,)`` class labels stored beside the images (``arr_1`` / ``labels`` of an ``.npz``), or ``None``.
        labels_source: Where ``labels`` come from.
    """

    path: Path
    kind: Literal["npz", "folder"]
    num_images: int
    image_size: tuple[int, int]
    files: list[str] = field(default_factory=list)
    labels: np.ndarray | None = None
    labels_source: str = ""

    def describe(self) -> str:
        """The set in words: path, format, count and size."""
        h, w = self.image_size
        what = "arr_0 of an ADM-layout .npz" if self.kind == "npz" else "image files of a folder"
        return f"{self.path} ({what}, {self.num_images} images of {h}x{w})"

    def batches(self, start: int, stop: int, *, batch_size: int = 64, num_workers: int = 0) -> Iterator[Tensor]:
        """``(B, 3, H, W)`` uint8 batches of images ``start:stop``, in order.

        Args:
            start: First image.
            stop: One past the last image.
            batch_size: Images per batch.
            num_workers: Decoding processes for a folder (0: in this process).
        """
        if self.kind == "npz":
            with NpzArrayReader(self.path, "arr_0") as reader:
                for b0 in range(start, stop, batch_size):
                    array = reader.read(b0, min(b0 + batch_size, stop))  # (B, H, W, 3)
                    yield torch.from_numpy(array).permute(0, 3, 1, 2)  # (B, 3, H, W)
            return
        yield from _image_batches(
            self.files[start:stop], self.image_size, crop=None, batch_size=batch_size, num_workers=num_workers
        )

    def content_key(self, cache_root: Path | None = None) -> str:
        """A key that changes when the images may have: the file's sha256 (``.npz``), or the sorted listing with
        sizes and modification times (folder)."""
        if self.kind == "npz":
            return "npz-sha256:" + file_sha256(self.path, cache_root)
        digest = hashlib.sha256()
        root = self.path.resolve()
        for f in self.files:
            st = os.stat(f)
            digest.update(f"{os.path.relpath(f, root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return "folder-listing:" + digest.hexdigest()


def _npz_labels(path: Path, names: list[str], n: int) -> tuple[np.ndarray | None, str]:
    for name in ("labels", "arr_1"):
        if name not in names:
            continue
        labels = _small_array(path, name)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{path}: {name!r} must be a 1-D integer array of class labels (ADM layout), got {labels.dtype} "
                f"{labels.shape}"
            )
        if labels.shape[0] != n:
            raise ValueError(f"{path}: {name!r} holds {labels.shape[0]} labels but arr_0 holds {n} images")
        return labels, f"{name} of {path.name}"
    return None, ""


def open_samples(path: str | os.PathLike) -> SampleSet:
    """Open generated samples: an ADM-layout ``.npz`` or a folder of image files (checked, nothing loaded).

    Raises:
        FileNotFoundError: Nothing at ``path``.
        ValueError: A file that is not an ``.npz`` with ``arr_0`` uint8 ``N x H x W x 3``, or a folder without images.
    """
    p = Path(path)
    if p.is_dir():
        files, _, _ = scan_images(p)
        w, h = decode_image(files[0]).image.size
        return SampleSet(p, "folder", len(files), (h, w), files=files)
    if not p.exists():
        raise FileNotFoundError(
            f"samples {p} do not exist; give an .npz (arr_0: uint8 N x H x W x 3) or an image folder"
        )
    if p.suffix.lower() != ".npz":
        raise ValueError(f"samples {p} must be an .npz (arr_0: uint8 N x H x W x 3, as ADM) or a folder of images")
    names = _npz_names(p)
    if "arr_0" not in names:
        raise ValueError(
            f"{p} has no arr_0 (it holds {names}); ADM-layout samples are np.savez(path, images) with images uint8 "
            "N x H x W x 3"
        )
    with NpzArrayReader(p, "arr_0") as reader:
        _check_image_array(reader, f"samples {p}")
        n, h, w, _ = reader.shape
    labels, source = _npz_labels(p, names, n)
    return SampleSet(p, "npz", n, (h, w), labels=labels, labels_source=source)


@dataclass
class ReferenceBatch:
    """An ADM reference batch (``.npz``): stored statistics and the images or features for precision / recall.

    Build it with :func:`load_reference`.

    Attributes:
        path: The file.
        sha256: Its SHA-256.
        fid: Stored ``mu`` / ``sigma`` (``None`` when absent).
        sfid: Stored ``mu_s`` / ``sigma_s`` (``None`` when absent).
        content: What ``arr_0`` holds: ``"images"``, ``"features"`` (``N x 2048`` pool features) or ``"none"``.
        num_images: Rows of ``arr_0`` (0 without it).
        image_size: ``(H, W)`` of its images, or ``None``.
        info: The ``fvq_info`` record of a file written by :func:`make_reference_batch` (empty otherwise).
    """

    path: Path
    sha256: str
    fid: Gaussian | None
    sfid: Gaussian | None
    content: Literal["images", "features", "none"]
    num_images: int
    image_size: tuple[int, int] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def pool_features(self) -> Tensor:
        """The ``(N, 2048)`` pool features stored as ``arr_0`` (``content == "features"``)."""
        if self.content != "features":
            raise ValueError(f"{self.path}: arr_0 holds {self.content}, not features")
        return torch.from_numpy(_small_array(self.path, "arr_0").astype(np.float32))


def _stored_gaussian(path: Path, names: list[str], mu: str, sigma: str, dim: int) -> Gaussian | None:
    if mu not in names and sigma not in names:
        return None
    if mu not in names or sigma not in names:
        raise ValueError(f"reference {path} holds only one of {mu!r} and {sigma!r}; an ADM reference batch has both")
    m, s = _small_array(path, mu), _small_array(path, sigma)
    if not (np.issubdtype(m.dtype, np.floating) and np.issubdtype(s.dtype, np.floating)):
        raise ValueError(f"reference {path}: {mu!r} and {sigma!r} must be floating arrays, got {m.dtype}, {s.dtype}")
    _check_gaussian(m, s, dim, f"reference {path}")
    if not (np.isfinite(m).all() and np.isfinite(s).all()):
        raise ValueError(f"reference {path}: {mu!r} or {sigma!r} has non-finite values")
    return Gaussian(
        torch.from_numpy(m.astype(np.float64)),
        torch.from_numpy(s.astype(np.float64)),
        f"{mu}/{sigma} stored in {path.name}",
    )


def load_reference(path: str | os.PathLike, *, cache: str | os.PathLike | bool = True) -> ReferenceBatch:
    """Read and check an ADM reference batch (statistics loaded; images only checked).

    Args:
        path: The ``.npz``.
        cache: Where the file's SHA-256 is memoised (see :func:`evaluate_samples`).

    Raises:
        FileNotFoundError: No file.
        ValueError: A layout other than ADM's (the message names what is wrong).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"reference batch {p} does not exist; download ADM's (e.g. VIRTUAL_imagenet256_labeled.npz) or build one "
            "with `fvq eval-gen --make-ref FOLDER --out REF.npz`"
        )
    names = _npz_names(p)
    fid = _stored_gaussian(p, names, "mu", "sigma", FEATURE_DIM)
    sfid = _stored_gaussian(p, names, "mu_s", "sigma_s", SPATIAL_DIM)
    content: Literal["images", "features", "none"] = "none"
    num, size = 0, None
    if "arr_0" in names:
        with NpzArrayReader(p, "arr_0") as reader:
            shape, dtype = reader.shape, reader.dtype
            if len(shape) == 2:
                if shape[1] != FEATURE_DIM or not np.issubdtype(dtype, np.floating):
                    raise ValueError(
                        f"reference {p}: a 2-D arr_0 must be N x {FEATURE_DIM} float pool features, got {dtype} {shape}"
                    )
                content, num = "features", shape[0]
            else:
                _check_image_array(reader, f"reference {p}")
                content, num, size = "images", shape[0], (shape[1], shape[2])
    if fid is None and content != "images":
        raise ValueError(
            f"reference {p} holds neither stored mu/sigma nor arr_0 images (arrays: {names}); an ADM reference batch "
            "has mu, sigma, mu_s, sigma_s and arr_0"
        )
    info: dict[str, Any] = {}
    if "fvq_info" in names:
        try:
            info = json.loads(str(_small_array(p, "fvq_info")))
        except (ValueError, TypeError):
            info = {}
    return ReferenceBatch(p, file_sha256(p, _cache_root(cache)), fid, sfid, content, num, size, info)


def file_sha256(path: str | os.PathLike, cache_root: str | os.PathLike | None = None) -> str:
    """SHA-256 of a file, memoised under ``cache_root`` by (absolute path, size, modification time).

    Under ``torch.distributed`` rank 0 reads the file and the digest is shared (every rank must call this).
    """
    p = Path(path)
    digest = None
    if distributed.is_main_process():
        st = p.stat()
        memo = None
        if cache_root is not None:
            ident = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
            memo = Path(cache_root) / "sha256" / f"{hashlib.sha256(ident).hexdigest()[:32]}.txt"
            if memo.is_file():
                digest = memo.read_text().strip()
        if not digest:
            digest = sha256_file(p)
            if memo is not None:
                _atomic_write_text(memo, digest + "\n")
    return str(distributed.all_gather_objects(digest)[0])


# ----------------------------------------------------------------------------------------------------------------
# computing features


def _as_nchw(batch: Tensor | np.ndarray) -> Tensor:
    if isinstance(batch, np.ndarray):
        if batch.ndim != 4 or batch.shape[3] != 3:
            raise ValueError(f"numpy batches must be N x H x W x 3 (ADM layout), got {batch.shape}")
        return torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        batch = batch[0]  # (images, labels) from a data loader
    if not isinstance(batch, Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
        got = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
        raise ValueError(f"image batches must be (B, 3, H, W) tensors or N x H x W x 3 arrays, got {got}")
    return batch


def _module_device(module: Any) -> torch.device:
    params = getattr(module, "parameters", None)
    if params is None:
        return torch.device("cpu")
    first = next(iter(params()), None)
    return first.device if first is not None else torch.device("cpu")


@torch.inference_mode()
def _run_pass(
    batches: Iterable[Tensor | np.ndarray],
    inception: FIDInception,
    *,
    classifier: ClassifierInception | None,
    shared_trunk: bool,
    features: bool,
    value_range: ValueRange,
    total: int | None,
    progress: bool,
    desc: str,
) -> Activations:
    """One pass over the images: pool + spatial features (when ``features``) and logits (with a classifier)."""
    device = _module_device(inception)
    pools, spatials, logits = [], [], []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            images = _as_nchw(batch)
            x = inception.preprocess(images.to(device), value_range=value_range)  # (B, 3, 299, 299)
            if features or (classifier is not None and shared_trunk):
                out = inception.run_network(x)
                pools.append(out.pool.cpu())
                spatials.append(out.spatial.cpu())
            if classifier is not None:
                if shared_trunk:
                    logits.append(classifier.logits_from_pool(out.pool).cpu())
                else:
                    logits.append(classifier(x.to(_module_device(classifier))).logits.cpu())
            bar.update(images.shape[0])
    pool = torch.cat(pools) if pools else torch.zeros(0, FEATURE_DIM)
    spatial = torch.cat(spatials) if spatials else torch.zeros(0, SPATIAL_DIM)
    if classifier is None:
        return Activations(pool, spatial)
    return Activations(pool, spatial, torch.cat(logits) if logits else torch.zeros(0, NUM_CLASSES))


def compute_activations(
    images: Iterable[Tensor | np.ndarray],
    inception: FIDInception,
    *,
    classifier: ClassifierInception | None = None,
    value_range: ValueRange = (-1.0, 1.0),
    total: int | None = None,
    progress: bool = True,
    desc: str = "Inception features",
) -> Activations:
    """Pool, spatial and (with a classifier) logit features of a stream of image batches.

    Only features are kept: the batches can come from a generator over a file of any size.

    Args:
        images: Batches: ``(B, 3, H, W)`` tensors (uint8 in [0, 255], or float in ``value_range``), or ``N x H x W x 3``
            uint8 numpy arrays (ADM's layout), or ``(images, labels)`` pairs.
        inception: The FID Inception (:func:`~fvq.evaluation.inception.load_inception`).
        classifier: The IS classifier; its logits come from the FID Inception's pool features when the two share a
            trunk (:func:`~fvq.evaluation.inception_is.shares_trunk`), else from its own pass.
        value_range: ``(low, high)`` of floating images.
        total: Number of images, for the progress bar.
        progress: Show a tqdm bar (rate and ETA).
        desc: The bar's label.

    Returns:
        :class:`Activations` on the CPU.
    """
    shared = classifier is not None and shares_trunk(classifier, getattr(inception, "network", None))
    return _run_pass(
        images,
        inception,
        classifier=classifier,
        shared_trunk=shared,
        features=True,
        value_range=value_range,
        total=total,
        progress=progress,
        desc=desc,
    )


def _rank_slice(n: int) -> tuple[int, int]:
    """This rank's contiguous share ``[start, stop)`` of ``n`` items (sizes differ by at most one)."""
    r, w = distributed.rank(), distributed.world_size()
    return n * r // w, n * (r + 1) // w


def _gather_rows(local: Tensor, n: int) -> Tensor:
    """Every rank's ``(n_r, D)`` slice (from :func:`_rank_slice`) concatenated in rank order, on every rank."""
    w = distributed.world_size()
    if w == 1:
        return local
    import torch.distributed as dist

    counts = [n * (r + 1) // w - n * r // w for r in range(w)]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else local.device
    padded = torch.zeros(max(counts), *local.shape[1:], dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = distributed.all_gather_tensor(padded)
    return torch.cat([part[:c].cpu() for part, c in zip(parts, counts)])


def _cache_root(cache: str | os.PathLike | bool) -> Path | None:
    if cache is False:
        return None
    if cache is True:
        return fvq_cache_dir() / "generation"
    return Path(cache)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _activation_key(content_key: str, protocol: str) -> str:
    record = {"format": ACTIVATIONS_FORMAT, "content": content_key, "inception": protocol, "spatial": SPATIAL_SPEC}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:40]


def _load_cached(path: Path, n: int) -> Activations | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            pool, spatial = torch.from_numpy(f["pool"]), torch.from_numpy(f["spatial"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None  # an unreadable cache file is recomputed (and replaced)
    if pool.shape != (n, FEATURE_DIM) or spatial.shape != (n, SPATIAL_DIM):
        return None
    return Activations(pool, spatial)


def _set_activations(
    images: SampleSet,
    inception: FIDInception,
    *,
    classifier: ClassifierInception | None,
    shared_trunk: bool,
    cache_root: Path | None,
    batch_size: int,
    num_workers: int,
    progress: bool,
    desc: str,
) -> tuple[Activations, dict[str, Any]]:
    """Features of a whole set: from the cache, or computed (each rank a slice, gathered) and cached by rank 0."""
    n = images.num_images
    key = _activation_key(images.content_key(cache_root), inception.protocol) if cache_root is not None else ""
    feature_file = cache_root / f"activations-{key}.npz" if cache_root is not None else None
    logit_file = None
    # logits of a classifier of its own trunk are cached under its file's checksum (one built in memory has none)
    if cache_root is not None and classifier is not None and not shared_trunk and classifier.sha256:
        logit_file = cache_root / f"logits-{key}-{classifier.sha256[:16]}.npy"
    cached = _load_cached(feature_file, n) if feature_file is not None else None
    cached_logits = None
    if logit_file is not None and logit_file.is_file():
        arr = np.load(logit_file)
        cached_logits = torch.from_numpy(arr) if arr.shape == (n, NUM_CLASSES) else None
    hits = distributed.all_gather_objects((cached is not None, cached_logits is not None))
    features_hit = all(h[0] for h in hits)
    logits_hit = all(h[1] for h in hits)
    need_logits = classifier is not None and not shared_trunk and not logits_hit
    record = {"cache_file": str(feature_file) if feature_file else None, "features_from_cache": features_hit}
    if not features_hit or need_logits:
        start, stop = _rank_slice(n)
        local = _run_pass(
            images.batches(start, stop, batch_size=batch_size, num_workers=num_workers),
            inception,
            classifier=classifier if need_logits else None,
            shared_trunk=False,
            features=not features_hit,
            value_range=(-1.0, 1.0),  # unused: the batches are uint8
            total=stop - start,
            progress=progress and distributed.is_main_process(),
            desc=desc,
        )
        if not features_hit:
            cached = Activations(_gather_rows(local.pool, n), _gather_rows(local.spatial, n))
            if feature_file is not None and distributed.is_main_process():
                meta = {"format": ACTIVATIONS_FORMAT, "content": images.describe(), "num_images": n}
                _atomic_save_npz(
                    feature_file,
                    {
                        "pool": cached.pool.numpy(),
                        "spatial": cached.spatial.numpy(),
                        "meta": np.array(json.dumps(meta)),
                    },
                )
        if need_logits:
            assert local.logits is not None
            cached_logits = _gather_rows(local.logits, n)
            if logit_file is not None and distributed.is_main_process():
                logit_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = logit_file.with_name(f".{logit_file.name}.{os.getpid()}.tmp.npy")
                np.save(tmp, cached_logits.numpy())
                os.replace(tmp, logit_file)
        distributed.barrier()
    assert cached is not None
    if classifier is not None:
        if shared_trunk:
            cached.logits = torch.cat([classifier.logits_from_pool(p).cpu() for p in cached.pool.split(8192)])
        else:
            cached.logits = cached_logits
    record["logits"] = (
        None
        if classifier is None
        else "pool_3 features @ classifier weight (shared trunk)"
        if shared_trunk
        else "classifier network pass" + (" (cached)" if logits_hit else "")
    )
    return cached, record


# ----------------------------------------------------------------------------------------------------------------
# the report


def class_balance(labels: np.ndarray | list[int], *, source: str, num_classes: int | None = None) -> dict[str, Any]:
    """Summary of the class labels of a sample set: classes present, images per class, uniformity."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"class labels must be a non-empty 1-D integer array, got {arr.dtype} {arr.shape}")
    _, counts = np.unique(arr, return_counts=True)
    out: dict[str, Any] = {
        "source": source,
        "num_labels": int(arr.size),
        "classes_present": int(counts.size),
        "min_per_class": int(counts.min()),
        "max_per_class": int(counts.max()),
        "uniform": bool(counts.min() == counts.max()),
    }
    if num_classes is not None:
        out["num_classes"] = int(num_classes)
        out["classes_missing"] = int(num_classes) - int(counts.size)
    return out


def _sample_config(samples: SampleSet) -> tuple[dict[str, Any] | None, Path | None]:
    folder = samples.path if samples.kind == "folder" else samples.path.parent
    path = folder / SAMPLE_CONFIG
    if not path.is_file():
        return None, None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or remove it") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object of sampling settings, got {type(config).__name__}")
    return config, path


def _balance_from_config(config: Mapping[str, Any], path: Path, n: int) -> dict[str, Any] | None:
    num_classes = config.get("num_classes")
    num_classes = int(num_classes) if isinstance(num_classes, int) else None
    if isinstance(config.get("labels"), list):
        labels = np.asarray(config["labels"])
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{path}: 'labels' must list one integer class per sample ({n}), got {labels.shape}")
        return class_balance(labels, source=f"labels in {path.name}", num_classes=num_classes)
    counts = config.get("class_counts")
    if isinstance(counts, (list, dict)):
        values = list(counts.values()) if isinstance(counts, dict) else list(counts)
        if not values or not all(isinstance(v, int) and v >= 0 for v in values):
            raise ValueError(f"{path}: 'class_counts' must hold non-negative integers")
        present = [v for v in values if v > 0]
        out = {
            "source": f"class_counts in {path.name}",
            "num_labels": int(sum(values)),
            "classes_present": len(present),
            "min_per_class": min(present) if present else 0,
            "max_per_class": max(present) if present else 0,
            "uniform": bool(present) and min(present) == max(present),
        }
        if num_classes is not None:
            out.update(num_classes=num_classes, classes_missing=num_classes - len(present))
        return out
    return None


_LABELS = {
    "fid": "FID",
    "sfid": "sFID",
    "inception_score": "Inception Score",
    "precision": "Precision",
    "recall": "Recall",
}
_DEFINITIONS = {
    "fid": "Fréchet distance of pool_3 features to the reference's mu/sigma",
    "sfid": f"Fréchet distance of {SPATIAL_LAYER}[:7] features to the reference's mu_s/sigma_s",
    "inception_score": "exp E KL(p(y|x) || p(y)), softmax over 1,008 logits, mean over splits",
    "precision": "fraction of samples inside the reference k-NN manifold",
    "recall": "fraction of reference images inside the sample k-NN manifold",
}


@dataclass
class GenerationMetrics:
    """The figures of one ``eval-gen`` run and everything needed to read them.

    Attributes:
        metrics: ``fid``, ``sfid``, ``inception_score``, ``inception_score_std``, ``precision``, ``recall`` (those
            computed).
        unavailable: Metric -> why it was not computed.
        counts: Metric -> ``{"samples": N, "reference": N or words}``.
        samples: The sample set: path, format, N, image size, content key, preprocessing.
        reference: The reference batch: path, sha256, where each statistic comes from, its images.
        protocol: Inception protocol, classifier file, IS splits and seed, precision/recall k and blocks.
        class_balance: Class labels of the samples (:func:`class_balance`), or ``None`` when unknown.
        sample_settings: The ``sample_config.json`` beside the samples, or ``None``.
        notes: Things to know when comparing the figures (size mismatches, sample counts, split remainders).
        info: Run details: device, world size, seconds, cache use.
    """

    metrics: dict[str, float]
    unavailable: dict[str, str]
    counts: dict[str, dict[str, Any]]
    samples: dict[str, Any]
    reference: dict[str, Any]
    protocol: dict[str, Any]
    class_balance: dict[str, Any] | None = None
    sample_settings: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``metrics.json``."""
        return asdict(self)

    def to_markdown(self, title: str = "fvq eval-gen") -> str:
        """A short report: a table with every figure and its N, then what the samples and reference were."""
        s, r = self.samples, self.reference
        lines = [
            f"# {title}",
            "",
            "| metric | value | samples N | reference N | definition |",
            "| --- | ---: | ---: | --- | --- |",
        ]
        for key in ("fid", "sfid", "inception_score", "precision", "recall"):
            count = self.counts.get(key, {})
            if key in self.metrics:
                value = self.metrics[key]
                text = f"{value:.4f}" if key in ("precision", "recall") else f"{value:.3f}"
                if key == "inception_score" and "inception_score_std" in self.metrics:
                    text += f" ± {self.metrics['inception_score_std']:.3f}"
            else:
                text = "unavailable"
            definition = _DEFINITIONS[key] if key in self.metrics else self.unavailable.get(key, "")
            n_samples, n_reference = count.get("samples", ""), count.get("reference", "")
            lines.append(f"| {_LABELS[key]} | {text} | {n_samples} | {n_reference} | {definition} |")
        lines += [
            "",
            f"- samples: {s['path']} ({s['format']}, {s['num_images']} images of {s['image_size']})",
            f"- resize and crop of the samples: {s['preprocessing']}",
            f"- reference: {r['path']} (sha256 {r['sha256']})",
            f"- reference statistics: FID {r['fid_statistics']}; sFID {r['sfid_statistics']}",
            f"- reference images: {r['images']}",
            f"- Inception: {self.protocol['inception']}",
        ]
        if self.class_balance:
            b = self.class_balance
            missing = f", {b['classes_missing']} of {b['num_classes']} missing" if "classes_missing" in b else ""
            lines.append(
                f"- class balance ({b['source']}): {b['classes_present']} classes, {b['min_per_class']}-"
                f"{b['max_per_class']} images per class{missing}"
            )
        else:
            lines.append("- class balance: unknown (no labels array and no sample_config.json)")
        if self.sample_settings is not None:
            flat = ", ".join(
                f"{k}={v}"
                for k, v in self.sample_settings.items()
                if isinstance(v, (str, int, float, bool)) or v is None
            )
            lines.append(f"- sampling settings ({SAMPLE_CONFIG}): {flat or '(no scalar settings)'}")
        lines += [f"- note: {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def save(self, directory: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``metrics.json`` and ``metrics.md`` into ``directory`` (each atomically); call on one rank."""
        directory = Path(directory)
        json_path, md_path = directory / "metrics.json", directory / "metrics.md"
        _atomic_write_text(json_path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        _atomic_write_text(md_path, self.to_markdown())
        return json_path, md_path


# ----------------------------------------------------------------------------------------------------------------
# the entry points


def _resolve_classifier(
    classifier: ClassifierInception | str | os.PathLike | None,
    sha256: str | None,
    device: torch.device,
) -> tuple[ClassifierInception | None, str]:
    """The IS classifier and, without one, why not.

    A file given explicitly must load (errors propagate); a file only found in the environment or torch.hub's
    folder that cannot be used makes the IS unavailable with the reason, so FID and the rest are still computed.
    """
    if isinstance(classifier, ClassifierInception):
        return classifier.to(device), ""
    file, why = find_classifier_weights(classifier)
    if file is None:
        return None, why
    try:
        return load_classifier_inception(file, sha256=sha256, device=device), ""
    except ValueError as err:
        if classifier is not None:
            raise
        return None, f"found {file} ({why}) but cannot use it: {err}"


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def evaluate_samples(
    samples: str | os.PathLike | SampleSet,
    reference: str | os.PathLike | ReferenceBatch,
    *,
    inception: FIDInception | None = None,
    classifier: ClassifierInception | str | os.PathLike | None = None,
    classifier_sha256: str | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    cache: str | os.PathLike | bool = True,
    is_split_size: int = IS_SPLIT_SIZE,
    is_seed: int | None = IS_SEED,
    k: int = PR_K,
    pr_batch_size: int = PR_BATCH_SIZE,
    progress: bool = True,
) -> GenerationMetrics:
    """FID, sFID, Inception Score, precision and recall of generated samples against an ADM reference batch.

    Every rank under ``torch.distributed`` must call this; each computes the features of a slice, rank 0 computes
    the figures, and every rank returns them.

    Args:
        samples: An ADM-layout ``.npz`` or an image folder (or an opened :class:`SampleSet`).
        reference: The reference batch ``.npz`` (or a loaded :class:`ReferenceBatch`).
        inception: The FID Inception (loaded on ``device`` when ``None``).
        classifier: The IS classifier, or its weight file; ``None`` looks in ``$FVQ_IS_INCEPTION_WEIGHTS`` and
            torch.hub's checkpoint folder, and reports the IS as unavailable when nothing is there.
        classifier_sha256: The SHA-256 a different classifier file must have (default: pytorch-fid's).
        batch_size: Images per Inception batch.
        num_workers: Image-decoding processes for folders.
        device: Where the networks run (default: CUDA when available).
        cache: Feature cache folder; ``True``: ``<fvq cache>/generation``; ``False``: no cache.
        is_split_size: Samples per IS split (ADM: 5,000).
        is_seed: Shuffle seed before the IS splits; ``None`` keeps the file order (ADM).
        k: Precision / recall neighbourhood size (ADM: 3).
        pr_batch_size: Precision / recall distance block size (ADM: 10,000).
        progress: Show progress bars (rank 0).

    Returns:
        :class:`GenerationMetrics`.
    """
    _check_positive(batch_size=batch_size, is_split_size=is_split_size, k=k, pr_batch_size=pr_batch_size)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    started = time.perf_counter()
    dev = _device(device)
    cache_root = _cache_root(cache)
    sample_set = samples if isinstance(samples, SampleSet) else open_samples(samples)
    ref = reference if isinstance(reference, ReferenceBatch) else load_reference(reference, cache=cache)
    settings, settings_path = _sample_config(sample_set)
    if sample_set.num_images < 2:
        raise ValueError(f"samples {sample_set.path} hold {sample_set.num_images} image; FID needs at least 2")
    if inception is None:
        inception = load_inception(device=dev)
    clf, clf_missing = _resolve_classifier(classifier, classifier_sha256, dev)
    shared = clf is not None and shares_trunk(clf, getattr(inception, "network", None))

    # features of the samples, then of the reference images when something needs them
    acts, sample_record = _set_activations(
        sample_set,
        inception,
        classifier=clf,
        shared_trunk=shared,
        cache_root=cache_root,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        desc="samples: Inception",
    )
    ref_acts: Activations | None = None
    ref_record: dict[str, Any] = {}
    if ref.content == "images" and (ref.fid is None or ref.sfid is None or ref.num_images > k):
        ref_set = open_samples(ref.path)
        ref_acts, ref_record = _set_activations(
            ref_set,
            inception,
            classifier=None,
            shared_trunk=False,
            cache_root=cache_root,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
            desc="reference: Inception",
        )

    result = None
    if distributed.is_main_process():
        result = _score(
            sample_set=sample_set,
            ref=ref,
            acts=acts,
            ref_acts=ref_acts,
            classifier=clf,
            classifier_missing=clf_missing,
            shared_trunk=shared,
            inception=inception,
            settings=settings,
            settings_path=settings_path,
            is_split_size=is_split_size,
            is_seed=is_seed,
            k=k,
            pr_batch_size=pr_batch_size,
            device=dev,
        )
        result.info.update(
            device=str(dev),
            world_size=distributed.world_size(),
            seconds=round(time.perf_counter() - started, 2),
            samples_cache=sample_record,
            reference_cache=ref_record or None,
        )
    return distributed.all_gather_objects(result)[0]  # type: ignore[return-value]


def _non_rgb_files(files: list[str]) -> dict[str, int]:
    """``{PIL mode: count}`` of the files that are not stored as RGB (headers only, nothing decoded)."""
    counts: dict[str, int] = {}
    for f in files:
        try:
            with Image.open(f) as image:
                mode = image.mode
        except (OSError, ValueError):
            continue  # unreadable files stop the feature pass with their name
        if mode != "RGB":
            counts[mode] = counts.get(mode, 0) + 1
    return counts


def _reference_gaussian(stored: Gaussian | None, ref_features: Tensor | None, what: str) -> Gaussian | None:
    """The stored statistics; else those of the reference's images (as ADM); else ``None``."""
    if stored is not None:
        return stored
    if ref_features is not None and ref_features.shape[0] >= 2:
        n = ref_features.shape[0]
        return Gaussian.of_features(ref_features, source=f"{what} computed from the {n} arr_0 images (none stored)")
    return None


def _describe_reference_images(ref: ReferenceBatch) -> str:
    if ref.content == "features":
        return f"{ref.num_images} stored pool feature vectors"
    if ref.content == "none" or ref.image_size is None:
        return "none"
    h, w = ref.image_size
    crop = ref.info.get("crop")
    how = f"{crop} (S = {ref.info.get('image_size')}) from {ref.info.get('source_folder')}" if crop else "as stored"
    return f"{ref.num_images} images of {h}x{w}, {how}"


def _describe_classifier(classifier: ClassifierInception | None, shared_trunk: bool) -> dict[str, Any] | None:
    if classifier is None:
        return None
    return {
        "path": str(classifier.path) if classifier.path else None,
        "sha256": classifier.sha256 or None,
        "logits": "pool_3 @ fc.weight.T, no bias (ADM's softmax/logits/MatMul)",
        "trunk": "the FID Inception's (logits from its pool features)" if shared_trunk else "its own (second pass)",
    }


def _score(
    *,
    sample_set: SampleSet,
    ref: ReferenceBatch,
    acts: Activations,
    ref_acts: Activations | None,
    classifier: ClassifierInception | None,
    classifier_missing: str,
    shared_trunk: bool,
    inception: FIDInception,
    settings: dict[str, Any] | None,
    settings_path: Path | None,
    is_split_size: int,
    is_seed: int | None,
    k: int,
    pr_batch_size: int,
    device: torch.device,
) -> GenerationMetrics:
    """Every figure from the gathered features, with what it was computed from (rank 0)."""
    n = len(acts)
    metrics: dict[str, float] = {}
    unavailable: dict[str, str] = {}
    counts: dict[str, dict[str, Any]] = {}
    notes: list[str] = []

    # FID and sFID against the stored statistics (else those of the reference's images, as ADM)
    sources = {"fid": "absent", "sfid": "absent"}
    for key, what, stored, features, ref_features in (
        ("fid", "mu/sigma", ref.fid, acts.pool, None if ref_acts is None else ref_acts.pool),
        ("sfid", "mu_s/sigma_s", ref.sfid, acts.spatial, None if ref_acts is None else ref_acts.spatial),
    ):
        gaussian = _reference_gaussian(stored, ref_features, what)
        if gaussian is None:
            unavailable[key] = f"the reference stores no {what} and has no arr_0 images to compute them from"
            continue
        metrics[key] = frechet_to_gaussian(features, gaussian.mu, gaussian.sigma)
        sources[key] = gaussian.source
        if stored is None:
            reference_n: int | str = ref.num_images
        else:
            stored_n = ref.info.get("num_images")  # known for files made by make_reference_batch
            reference_n = f"stored ({stored_n} images)" if stored_n else "stored"
        counts[key] = {"samples": n, "reference": reference_n}

    # Inception Score from the classifier's logits
    if acts.logits is None:
        unavailable["inception_score"] = classifier_missing or "no IS classifier was given"
    else:
        score = inception_score(acts.logits, split_size=is_split_size, seed=is_seed)
        metrics["inception_score"], metrics["inception_score_std"] = score.mean, score.std
        counts["inception_score"] = {"samples": n, "reference": "-"}
        if n < is_split_size:
            notes.append(
                f"IS: {n} samples are fewer than the split size {is_split_size}; they form one split of {n} (the "
                "IS grows with the split size, so it is not comparable with a figure over splits of "
                f"{is_split_size})"
            )
        elif n % is_split_size:
            notes.append(
                f"IS: {n} samples are not a multiple of the split size {is_split_size}; the last split holds "
                f"{n % is_split_size} samples (ADM's rule)"
            )

    # precision and recall on the pool features of all reference vectors and all samples
    ref_pool = ref.pool_features() if ref.content == "features" else None if ref_acts is None else ref_acts.pool
    if ref_pool is None:
        reason = "the reference has no arr_0 (images or pool features) to build its manifold from"
        unavailable.update(precision=reason, recall=reason)
    elif ref_pool.shape[0] <= k or n <= k:
        reason = f"a k = {k} manifold needs more than {k} vectors per set ({ref_pool.shape[0]} reference, {n} samples)"
        unavailable.update(precision=reason, recall=reason)
    else:
        pr = precision_recall(
            ref_pool, acts.pool, k=k, row_batch_size=pr_batch_size, col_batch_size=pr_batch_size, device=device
        )
        metrics["precision"], metrics["recall"] = pr.precision, pr.recall
        counts["precision"] = counts["recall"] = {"samples": n, "reference": pr.num_reference}

    # what was compared
    h, w = sample_set.image_size
    converted = _non_rgb_files(sample_set.files) if sample_set.kind == "folder" else {}
    if converted:
        modes = ", ".join(f"{mode}: {count}" for mode, count in sorted(converted.items()))
        notes.append(
            f"{sum(converted.values())} of {n} sample files are not RGB ({modes}); they were converted to 8-bit RGB "
            "(grayscale replicated, transparency composited over white) before scoring"
        )
    if ref.image_size is not None and ref.image_size != sample_set.image_size:
        rh, rw = ref.image_size
        notes.append(
            f"the samples are {h}x{w} but the reference images are {rh}x{rw}; both are resized to 299x299 by the "
            "Inception, but the figures are not those of a same-resolution comparison"
        )
    if n != ADM_NUM_SAMPLES:
        notes.append(f"{n} samples: published figures use {ADM_NUM_SAMPLES} (FID and IS depend on the sample count)")
    balance = None
    if sample_set.labels is not None:
        num_classes = (settings or {}).get("num_classes")
        balance = class_balance(
            sample_set.labels,
            source=sample_set.labels_source,
            num_classes=num_classes if isinstance(num_classes, int) else None,
        )
    elif settings is not None and settings_path is not None:
        balance = _balance_from_config(settings, settings_path, n)
    return GenerationMetrics(
        metrics=metrics,
        unavailable=unavailable,
        counts=counts,
        samples={
            "path": str(sample_set.path),
            "format": "npz arr_0" if sample_set.kind == "npz" else "image folder",
            "num_images": n,
            "image_size": f"{h}x{w}",
            "preprocessing": (
                f"none: the {h}x{w} images are used as stored (no crop); the Inception resizes them to 299x299 "
                "(TF1 bilinear, as the ADM evaluator's graph)"
            ),
            "sample_config": str(settings_path) if settings_path else None,
            "converted_to_rgb": converted or None,
        },
        reference={
            "path": str(ref.path),
            "sha256": ref.sha256,
            "fid_statistics": sources["fid"],
            "sfid_statistics": sources["sfid"],
            "images": _describe_reference_images(ref),
            "fvq_info": ref.info or None,
        },
        protocol={
            "inception": inception.protocol,
            "spatial_features": SPATIAL_SPEC,
            "classifier": _describe_classifier(classifier, shared_trunk),
            "inception_score": {
                "split_size": is_split_size,
                "shuffle_seed": is_seed,
                "softmax": f"over all {NUM_CLASSES} logits",
            },
            "precision_recall": {
                "k": k,
                "row_batch_size": pr_batch_size,
                "col_batch_size": pr_batch_size,
                "distances": "squared Euclidean, float32",
            },
        },
        class_balance=balance,
        sample_settings=settings,
        notes=notes,
    )


def _write_npz_header(f, shape: tuple[int, ...], dtype: np.dtype) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_2_0(f, header)


def make_reference_batch(
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    image_size: int = 256,
    inception: FIDInception | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device | str | None = None,
    cache: str | os.PathLike | bool = True,
    progress: bool = True,
) -> ReferenceBatch:
    """Build an ADM-layout reference batch from a folder of real images.

    Every image is ADM-centre-cropped to ``image_size`` (:func:`~fvq.data.transforms.center_crop_llamagen`) and
    stored as ``arr_0`` (uint8 ``N x S x S x 3``, streamed to disk); ``mu``/``sigma`` and ``mu_s``/``sigma_s`` are
    the statistics of exactly those stored images; ``fvq_info`` (a JSON string) records how the file was made. The
    file is written to a temporary name and renamed at the end, so a failed run leaves nothing behind. The features
    are put in the cache, so scoring against the new file needs no pass over its images.

    Every rank under ``torch.distributed`` must call this: rank 0 crops and writes the images, every rank computes
    the features of a slice.

    Args:
        folder: The real images (searched recursively).
        out: The ``.npz`` to write (must not exist).
        image_size: S.
        inception: The FID Inception (loaded when ``None``).
        batch_size: Images per batch.
        num_workers: Decoding processes.
        device: Where the Inception runs.
        cache: Feature cache (see :func:`evaluate_samples`).
        progress: Show progress bars.

    Returns:
        The new :class:`ReferenceBatch`.
    """
    _check_positive(image_size=image_size, batch_size=batch_size)
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"--out {out} must end in .npz (the reference batch is an ADM-layout .npz)")
    if out.exists():
        raise ValueError(f"{out} exists; delete it or choose another --out (a reference batch is never overwritten)")
    files, _, _ = scan_images(folder)
    if len(files) < 2:
        raise ValueError(f"{folder} holds {len(files)} image; a reference batch needs at least 2")
    dev = _device(device)
    cache_root = _cache_root(cache)
    n, s = len(files), int(image_size)
    made_parent = not out.parent.exists()
    tmp = out.with_name(f".{out.name}.partial.npz")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # 1. rank 0 crops every image and streams it into arr_0
        if distributed.is_main_process():
            loader = _image_batches(files, (s, s), crop=s, batch_size=batch_size, num_workers=num_workers)
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                    _write_npz_header(f, (n, s, s, 3), np.dtype(np.uint8))
                    with tqdm(total=n, desc="reference: crop", unit="img", disable=not progress) as bar:
                        for batch in loader:
                            f.write(batch.permute(0, 2, 3, 1).contiguous().numpy().tobytes())  # (B, S, S, 3)
                            bar.update(batch.shape[0])
        distributed.barrier()
        # 2. every rank: the features of its slice of the stored images
        if inception is None:
            inception = load_inception(device=dev)
        stored = SampleSet(tmp, "npz", n, (s, s))
        local_start, local_stop = _rank_slice(n)
        local = _run_pass(
            stored.batches(local_start, local_stop, batch_size=batch_size),
            inception,
            classifier=None,
            shared_trunk=False,
            features=True,
            value_range=(-1.0, 1.0),  # unused: the batches are uint8
            total=local_stop - local_start,
            progress=progress and distributed.is_main_process(),
            desc="reference: Inception",
        )
        acts = Activations(_gather_rows(local.pool, n), _gather_rows(local.spatial, n))
        # 3. rank 0 adds the statistics and the record, then renames
        if distributed.is_main_process():
            fid, sfid = Gaussian.of_features(acts.pool), Gaussian.of_features(acts.spatial)
            info = {
                "format": REFERENCE_FORMAT,
                "source_folder": str(Path(folder).resolve()),
                "num_images": n,
                "image_size": s,
                "crop": ADM_CROP,
                "inception": inception.protocol,
                "spatial_features": SPATIAL_SPEC,
            }
            arrays = {
                "mu": fid.mu.numpy(),
                "sigma": fid.sigma.numpy(),
                "mu_s": sfid.mu.numpy(),
                "sigma_s": sfid.sigma.numpy(),
                "fvq_info": np.array(json.dumps(info)),
            }
            with zipfile.ZipFile(tmp, "a", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, array in arrays.items():
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
            os.replace(tmp, out)
        distributed.barrier()
    except BaseException:
        if distributed.is_main_process():
            if tmp.exists():
                tmp.unlink()
            if made_parent and out.parent.is_dir() and not any(out.parent.iterdir()):
                out.parent.rmdir()
        raise
    # the new file's features go into the cache (keyed by its content, as evaluate_samples looks them up)
    if cache_root is not None:
        key = _activation_key("npz-sha256:" + file_sha256(out, cache_root), inception.protocol)
        if distributed.is_main_process():
            meta = {"format": ACTIVATIONS_FORMAT, "content": f"arr_0 of {out}", "num_images": n}
            _atomic_save_npz(
                cache_root / f"activations-{key}.npz",
                {"pool": acts.pool.numpy(), "spatial": acts.spatial.numpy(), "meta": np.array(json.dumps(meta))},
            )
        distributed.barrier()
    return load_reference(out, cache=cache)
