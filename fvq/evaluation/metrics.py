"""Reconstruction metrics: PSNR (RGB and BT.601 luma), SSIM (correct and the published ``data_range=2`` variant).

Conventions (the same for every function here):

* Images are ``(B, 3, H, W)`` tensors. Floating tensors hold values in ``value_range`` (``(-1, 1)`` by default,
  the range fvq's tokenizers read and write; pass ``(0, 1)`` for images in [0, 1]); ``uint8`` tensors always hold
  values in [0, 255] and ignore ``value_range``. Values outside the range are clamped, as writing an image file does.
* ``quantize=True`` (the default) rounds both images to 8 bits first (``floor(255 x + 0.5)``, what saving a PNG
  does), because the standard protocols score reconstructions saved as 8-bit images.
* Every function returns one value per image, ``(B,)`` float64; a dataset's figure is the mean over images
  (:class:`ReconstructionMetrics` accumulates it over batches and ranks).

Protocols (see ``docs/metrics.md``): LlamaGen reports PSNR on RGB and FVQ on the Y channel; both report the SSIM
of ``skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=2.0)`` on [0, 1] images, which is
:func:`ssim_dr2` here. A data range of 2 for images whose values span 1 makes both SSIM constants 4x too large and
inflates the score; :func:`ssim` with its defaults is the SSIM of Wang et al. (2004).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fvq.distributed import all_reduce_sum_

ValueRange = tuple[float, float]

# ITU-R BT.601 luma for RGB in [0, 1], giving Y in [16, 235] on the 8-bit scale. These are the coefficients of
# MATLAB's rgb2ycbcr, used by the super-resolution toolkits (BasicSR `rgb2ycbcr(..., y_only=True)`) and by FVQ's
# evaluation for "PSNR on the Y channel": Y = 16 + 65.481 R + 128.553 G + 24.966 B.
BT601_Y_OFFSET = 16.0
BT601_Y_WEIGHTS = (65.481, 128.553, 24.966)


def _check_pair(images: Tensor, reconstructions: Tensor) -> None:
    for name, t in (("images", images), ("reconstructions", reconstructions)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(t.shape)}")
        if not (t.dtype == torch.uint8 or t.is_floating_point()):
            raise TypeError(f"{name} must be uint8 or floating point, got {t.dtype}")
    if images.shape != reconstructions.shape:
        raise ValueError(
            f"images and reconstructions must have the same shape, got {tuple(images.shape)} and "
            f"{tuple(reconstructions.shape)}"
        )


def _check_value_range(value_range: ValueRange) -> tuple[float, float]:
    if len(value_range) != 2 or not float(value_range[1]) > float(value_range[0]):
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range!r}")
    return float(value_range[0]), float(value_range[1])


def to_unit_range(images: Tensor, value_range: ValueRange = (-1.0, 1.0)) -> Tensor:
    """Map images to float64 values in [0, 1] (clamped).

    Args:
        images: ``(..., H, W)`` floating tensor with values in ``value_range``, or ``uint8`` in [0, 255]
            (``value_range`` is then ignored).
        value_range: ``(low, high)`` of floating inputs.

    Returns:
        Float64 tensor of the same shape, values in [0, 1].
    """
    if images.dtype == torch.uint8:
        return images.to(torch.float64) / 255.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    low, high = _check_value_range(value_range)
    return ((images.to(torch.float64) - low) / (high - low)).clamp_(0.0, 1.0)


def quantize_8bit(images: Tensor) -> Tensor:
    """Round [0, 1] images to the 256 levels of an 8-bit file, ``floor(255 x + 0.5) / 255``, same dtype.

    This is what saving with PIL after ``clamp(255 x + 0.5, 0, 255).to(uint8)`` (torchvision's ``save_image``,
    LlamaGen's ``127.5 x + 128`` on [-1, 1]) stores.
    """
    return torch.floor(images.clamp(0.0, 1.0) * 255.0 + 0.5) / 255.0


def rgb_to_y(images: Tensor) -> Tensor:
    """BT.601 luma of [0, 1] RGB images on the 8-bit scale: ``Y = 16 + 65.481 R + 128.553 G + 24.966 B``.

    Args:
        images: ``(B, 3, H, W)`` RGB in [0, 1].

    Returns:
        ``(B, 1, H, W)`` luma in [16, 235] (not rounded).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    w = torch.tensor(BT601_Y_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return BT601_Y_OFFSET + (images * w).sum(dim=1, keepdim=True)


def _prepare(images: Tensor, value_range: ValueRange, quantize: bool) -> Tensor:
    x = to_unit_range(images, value_range)
    return quantize_8bit(x) if quantize and images.dtype != torch.uint8 else x


def psnr(
    images: Tensor,
    reconstructions: Tensor,
    *,
    value_range: ValueRange = (-1.0, 1.0),
    channel: Literal["rgb", "y"] = "rgb",
    quantize: bool = True,
) -> Tensor:
    """Peak signal-to-noise ratio of each image, in dB.

    ``channel="rgb"``: ``10 log10(1 / MSE)`` with the MSE over all pixels and the three channels of the [0, 1]
    images (LlamaGen's protocol, ``skimage.metrics.peak_signal_noise_ratio`` on [0, 1] images).
    ``channel="y"``: ``10 log10(255^2 / MSE_Y)`` on the BT.601 luma of :func:`rgb_to_y` (FVQ's protocol).
    Identical images give ``inf``.

    Args:
        images: ``(B, 3, H, W)`` references (see the module docstring for ranges).
        reconstructions: ``(B, 3, H, W)`` reconstructions, same shape.
        value_range: ``(low, high)`` of floating inputs.
        channel: ``"rgb"`` or ``"y"``.
        quantize: Round both to 8 bits first (the standard protocols score saved 8-bit images).

    Returns:
        ``(B,)`` float64 PSNR per image.
    """
    _check_pair(images, reconstructions)
    x = _prepare(images, value_range, quantize)
    y = _prepare(reconstructions, value_range, quantize)
    if channel == "rgb":
        peak = 1.0
    elif channel == "y":
        x, y, peak = rgb_to_y(x), rgb_to_y(y), 255.0
    else:
        raise ValueError(f"channel must be 'rgb' or 'y', got {channel!r}")
    mse = (x - y).square().flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(peak**2 / mse)


def _window_1d(window: str, window_size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
    if window == "gaussian":
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        r = (window_size - 1) // 2
        t = torch.arange(-r, r + 1, dtype=dtype, device=device)
        g = torch.exp(-0.5 * (t / sigma) ** 2)
        return g / g.sum()
    if window == "uniform":
        return torch.full((window_size,), 1.0 / window_size, dtype=dtype, device=device)
    raise ValueError(f"window must be 'gaussian' or 'uniform', got {window!r}")


def _filter_valid(x: Tensor, w: Tensor) -> Tensor:
    """Separable filtering of every channel with window ``w``, keeping only windows fully inside the image.

    Written as ``k`` shifted multiply-adds per axis: exact in float64 and much faster on the CPU than a grouped
    float64 ``conv2d``.
    """
    k = w.numel()
    h_out, w_out = x.shape[-2] - k + 1, x.shape[-1] - k + 1
    cols = sum(w[j] * x[..., :, j : j + w_out] for j in range(k))  # (B, C, H, W - k + 1)
    return sum(w[i] * cols[..., i : i + h_out, :] for i in range(k))  # (B, C, H - k + 1, W - k + 1)


def ssim_unit_range(
    x: Tensor,
    y: Tensor,
    *,
    data_range: float = 1.0,
    window: Literal["gaussian", "uniform"] = "gaussian",
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    sample_covariance: bool = False,
) -> Tensor:
    """SSIM (Wang et al. 2004) of float images already in [0, 1], per image.

    The local statistics use the given window; only windows fully inside the image are averaged (as skimage and
    torchmetrics do after filtering), then the SSIM map is averaged over pixels and channels.
    ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2`` with ``L = data_range``. ``sample_covariance=True`` scales the local
    (co)variances by ``n / (n - 1)`` (n = window_size^2), as skimage does by default.

    Args:
        x: ``(B, C, H, W)`` images in [0, 1], H and W at least ``window_size``.
        y: ``(B, C, H, W)`` images in [0, 1].
        data_range: L, the span of the values (1.0 for [0, 1] images).
        window: ``"gaussian"`` (sigma ``sigma``) or ``"uniform"``.
        window_size: Odd window width.
        sigma: Gaussian standard deviation.
        k1, k2: Stabilising constants.
        sample_covariance: Unbiased local (co)variances.

    Returns:
        ``(B,)`` float64 SSIM per image.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"x and y must be (B, C, H, W) of the same shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images must be at least {window_size}x{window_size} for SSIM, got {tuple(x.shape[-2:])}")
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    w = _window_1d(window, window_size, sigma, torch.float64, x.device)
    mu_x, mu_y = _filter_valid(x, w), _filter_valid(y, w)  # (B, C, H', W')
    xx, yy, xy = _filter_valid(x * x, w), _filter_valid(y * y, w), _filter_valid(x * y, w)
    n = window_size**2
    cov_norm = n / (n - 1) if sample_covariance else 1.0
    var_x = cov_norm * (xx - mu_x * mu_x)
    var_y = cov_norm * (yy - mu_y * mu_y)
    cov_xy = cov_norm * (xy - mu_x * mu_y)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1)


def ssim(
    images: Tensor,
    reconstructions: Tensor,
    *,
    value_range: ValueRange = (-1.0, 1.0),
    quantize: bool = True,
    data_range: float | None = None,
    window: Literal["gaussian", "uniform"] = "gaussian",
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    sample_covariance: bool = False,
) -> Tensor:
    """Structural similarity of each image (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03).

    With the defaults this equals ``skimage.metrics.structural_similarity(a, b, channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)`` on [0, 1] images and
    torchmetrics' ``structural_similarity_index_measure(..., data_range=1.0)``.

    Args:
        images: ``(B, 3, H, W)`` references.
        reconstructions: ``(B, 3, H, W)`` reconstructions.
        value_range: ``(low, high)`` of floating inputs.
        quantize: Round both to 8 bits first.
        data_range: Span of the values in the units of ``value_range`` (255 for uint8 inputs). ``None`` (the
            default) uses the true span, ``high - low``; anything else changes the SSIM constants (see
            :func:`ssim_dr2` for the published variant).
        window, window_size, sigma, k1, k2, sample_covariance: See :func:`ssim_unit_range`.

    Returns:
        ``(B,)`` float64 SSIM per image.
    """
    _check_pair(images, reconstructions)
    if images.dtype == torch.uint8:
        span = 255.0
    else:
        low, high = _check_value_range(value_range)
        span = high - low
    dr = 1.0 if data_range is None else float(data_range) / span
    return ssim_unit_range(
        _prepare(images, value_range, quantize),
        _prepare(reconstructions, value_range, quantize),
        data_range=dr,
        window=window,
        window_size=window_size,
        sigma=sigma,
        k1=k1,
        k2=k2,
        sample_covariance=sample_covariance,
    )


def ssim_dr2(
    images: Tensor,
    reconstructions: Tensor,
    *,
    value_range: ValueRange = (-1.0, 1.0),
    quantize: bool = True,
) -> Tensor:
    """The SSIM LlamaGen and FVQ publish: ``structural_similarity(a, b, channel_axis=-1, data_range=2.0)``.

    skimage's defaults (7x7 uniform window, sample covariance, K1 0.01, K2 0.03) on [0, 1] images, with a data
    range of 2 although the values span 1. The constants are 4x too large, which raises the score; report it only
    to compare with published tables, and say so.

    Args:
        images: ``(B, 3, H, W)`` references.
        reconstructions: ``(B, 3, H, W)`` reconstructions.
        value_range: ``(low, high)`` of floating inputs (they are mapped to [0, 1] first, as the published code
            does).
        quantize: Round both to 8 bits first.

    Returns:
        ``(B,)`` float64 SSIM per image.
    """
    _check_pair(images, reconstructions)
    return ssim_unit_range(
        _prepare(images, value_range, quantize),
        _prepare(reconstructions, value_range, quantize),
        data_range=2.0,
        window="uniform",
        window_size=7,
        sample_covariance=True,
    )


class ReconstructionMetrics:
    """Accumulates per-image PSNR, PSNR-Y, SSIM, published SSIM and (optionally) LPIPS over an evaluation set.

    Sums and counts are kept in float64; under ``torch.distributed`` :meth:`compute` all-reduces them, so every
    rank reports the mean over the whole (sharded) set. Each rank must call :meth:`compute` (it is a collective).

    Keys of :meth:`compute`: ``psnr`` (RGB), ``psnr_y`` (BT.601 luma), ``ssim`` (Gaussian 11 / 1.5, correct data
    range), ``ssim_dr2`` (the published variant, :func:`ssim_dr2`), ``lpips`` (only if values were given),
    ``num_images``.

    Args:
        value_range: ``(low, high)`` of floating inputs.
        quantize: Round images and reconstructions to 8 bits first (the standard protocols; default on).
        device: Where the sums live (the device of the first batch by default; use the rank's GPU with NCCL).
    """

    KEYS = ("psnr", "psnr_y", "ssim", "ssim_dr2", "lpips")

    def __init__(
        self,
        *,
        value_range: ValueRange = (-1.0, 1.0),
        quantize: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        self.value_range = _check_value_range(value_range)
        self.quantize = quantize
        self.device = torch.device(device) if device is not None else None
        self.reset()

    def reset(self) -> None:
        # sums of psnr, psnr_y, ssim, ssim_dr2, lpips, then number of images, number of lpips values
        self._state = torch.zeros(len(self.KEYS) + 2, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, images: Tensor, reconstructions: Tensor, lpips: Tensor | None = None) -> None:
        """Add a batch.

        Args:
            images: ``(B, 3, H, W)`` references.
            reconstructions: ``(B, 3, H, W)`` reconstructions.
            lpips: Optional ``(B,)`` LPIPS of each pair (computed elsewhere, e.g. by ``fvq.losses.lpips``).
        """
        _check_pair(images, reconstructions)
        if self.device is None:
            self.device = images.device
            self._state = self._state.to(self.device)
        kw = {"value_range": self.value_range, "quantize": self.quantize}
        values = [
            psnr(images, reconstructions, channel="rgb", **kw).sum(),
            psnr(images, reconstructions, channel="y", **kw).sum(),
            ssim(images, reconstructions, **kw).sum(),
            ssim_dr2(images, reconstructions, **kw).sum(),
        ]
        b = images.shape[0]
        lpips_sum, n_lpips = torch.zeros((), dtype=torch.float64), 0
        if lpips is not None:
            lpips = lpips.detach().reshape(-1)
            if lpips.numel() != b:
                raise ValueError(f"lpips must hold one value per image ({b}), got shape {tuple(lpips.shape)}")
            lpips_sum, n_lpips = lpips.to(torch.float64).sum(), b
        values.append(lpips_sum)
        self._state[:5] += torch.stack([v.to(self._state.device) for v in values])
        self._state[5] += b
        self._state[6] += n_lpips

    def compute(self) -> dict[str, float]:
        """Means over everything seen (all ranks); ``lpips`` only when LPIPS values were passed."""
        state = self._state.clone()
        all_reduce_sum_(state)
        n, n_lpips = float(state[5]), float(state[6])
        if n == 0:
            raise ValueError("ReconstructionMetrics.compute() called before any update()")
        out = {key: float(state[i]) / n for i, key in enumerate(self.KEYS[:4])}
        if n_lpips > 0:
            if n_lpips != n:
                raise ValueError(f"lpips was given for {int(n_lpips)} of {int(n)} images; give it for all or none")
            out["lpips"] = float(state[4]) / n_lpips
        out["num_images"] = n
        return out
