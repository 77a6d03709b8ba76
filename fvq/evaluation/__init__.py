"""Evaluation: reconstruction metrics (PSNR, SSIM), the FID Inception and Fréchet distance.

Protocols and exact formulas are in ``docs/metrics.md``.
"""

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
    FIDInception,
    extract_features,
    find_packaged_inception,
    load_inception,
    resize_bilinear_tf1,
    resolve_inception_path,
)
from fvq.evaluation.metrics import (
    ReconstructionMetrics,
    psnr,
    quantize_8bit,
    rgb_to_y,
    ssim,
    ssim_dr2,
    ssim_unit_range,
    to_unit_range,
)

__all__ = [
    "FID_INCEPTION_SHA256",
    "FIDInception",
    "FeatureStats",
    "ReconstructionMetrics",
    "cached_reference_stats",
    "extract_features",
    "fid_from_features",
    "fid_from_stats",
    "find_packaged_inception",
    "frechet_distance",
    "load_inception",
    "psnr",
    "quantize_8bit",
    "resize_bilinear_tf1",
    "resolve_inception_path",
    "rgb_to_y",
    "ssim",
    "ssim_dr2",
    "ssim_unit_range",
    "stats_cache_path",
    "to_unit_range",
]
