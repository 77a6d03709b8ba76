"""Data for tokenizer training and evaluation: an embedded default set, image folders, tar shards, transforms; and
token stores for training the generator (:class:`TokenDataset`, items :class:`TokenSample`).

Every image dataset yields :class:`ImageSample` ``(image, label)`` with ``image`` a float32 tensor (3, S, S) in [-1, 1]
and ``label`` an int64 scalar (-1 when there are no labels). Build them from a plain config dict with
:func:`build_dataset` and wrap them with :func:`build_loader`. See docs/data.md.
"""

from fvq.data.build import (
    DATASET_TYPES,
    ImageLoader,
    ResumableDistributedSampler,
    bad_file_stats,
    build_dataset,
    build_loader,
    build_transform,
)
from fvq.data.embedded import PHOTOS, TRAIN_PHOTOS, VAL_PHOTOS, EmbeddedPhotos, load_photo
from fvq.data.folder import EmptyDatasetError, ImageFolder, scan_images
from fvq.data.images import (
    IMAGE_EXTENSIONS,
    BadFilePolicy,
    BadFileStats,
    BadImageError,
    DecodedImage,
    ImageSample,
    TooManyBadFilesError,
    decode_image,
    to_rgb,
)
from fvq.data.shards import ShardDataset, ShardWriter, expand_urls, iter_tar_samples, write_shards_from_folder
from fvq.data.tokens import TokenDataset, TokenSample, TokenStore, ViewCrops, ViewSpec
from fvq.data.transforms import (
    CropParams,
    EvalCrop,
    RandomResizedCropPaper,
    center_crop_fvq,
    center_crop_llamagen,
    sample_rng,
    to_pil,
    to_tensor,
)

__all__ = [
    "DATASET_TYPES",
    "IMAGE_EXTENSIONS",
    "PHOTOS",
    "TRAIN_PHOTOS",
    "VAL_PHOTOS",
    "BadFilePolicy",
    "BadFileStats",
    "BadImageError",
    "CropParams",
    "DecodedImage",
    "EmbeddedPhotos",
    "EmptyDatasetError",
    "EvalCrop",
    "ImageFolder",
    "ImageLoader",
    "ImageSample",
    "RandomResizedCropPaper",
    "ResumableDistributedSampler",
    "ShardDataset",
    "ShardWriter",
    "TokenDataset",
    "TokenSample",
    "TokenStore",
    "TooManyBadFilesError",
    "ViewCrops",
    "ViewSpec",
    "bad_file_stats",
    "build_dataset",
    "build_loader",
    "build_transform",
    "center_crop_fvq",
    "center_crop_llamagen",
    "decode_image",
    "expand_urls",
    "iter_tar_samples",
    "load_photo",
    "sample_rng",
    "scan_images",
    "to_pil",
    "to_rgb",
    "to_tensor",
    "write_shards_from_folder",
]
