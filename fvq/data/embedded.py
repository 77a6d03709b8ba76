"""The default dataset: crops of the public-domain colour photographs shipped inside scikit-image's wheel.

Nothing is downloaded: the files are read directly from the installed ``skimage/data`` folder (we do not call
``skimage.data.<name>()``, which may try to fetch missing files with pooch). A photo whose file is missing is skipped
with a warning; a split with no photo left raises an error.

Photos are split by photograph, so no held-out pixel is ever trained on:

- train: astronaut, rocket, hubble_deep_field, immunohistochemistry, retina
- val (held out): chelsea, coffee

Each photo is first brought to a short side of ``2 * base_size - 1`` pixels (bicubic, antialiased; never enlarged
here), so a crop covers a meaningful part of the scene; ``base_size`` defaults to ``4 * image_size`` (128 for 32 px
crops: a crop spans about a quarter of the photo's short side). Then, as in the paper's recipe, the short side is
resized to an integer drawn from [base_size, 1.25 * base_size], a random ``image_size`` crop is taken and flipped
horizontally with probability 0.5.

- train: ``samples_per_epoch`` crops per epoch, crop ``i`` of epoch ``e`` a pure function of ``(seed, e, i)``.
- val: ``val_samples`` crops, crop ``i`` from held-out photo ``i % 2``, drawn with ``sample_rng(val_seed, i)`` (no
  flip); the same for every run, seed and epoch. The default 1,024 crops of 32 px give 65,536 tokens at
  downsampling factor 4 (16 per code for K = 4,096), the minimum the usage measurement needs.
"""

from __future__ import annotations

import importlib.resources
import logging
from dataclasses import dataclass

from PIL import Image
from torch.utils.data import Dataset

from fvq.data.images import ImageSample, SharedEpoch, decode_image, make_sample
from fvq.data.transforms import CropParams, RandomResizedCropPaper, resize_short_side, sample_rng, to_tensor

__all__ = ["PHOTOS", "TRAIN_PHOTOS", "VAL_PHOTOS", "EmbeddedPhotos", "Photo", "load_photo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Photo:
    """A photograph bundled with scikit-image.

    Attributes:
        name: The ``skimage.data`` function that returns it.
        filename: File inside the installed ``skimage/data`` folder.
        size: (height, width) in pixels.
        credit: Origin and licence as documented by scikit-image.
    """

    name: str
    filename: str
    size: tuple[int, int]
    credit: str


PHOTOS: dict[str, Photo] = {
    p.name: p
    for p in (
        Photo(
            "astronaut",
            "astronaut.png",
            (512, 512),
            "Eileen Collins, NASA Great Images database; no known copyright restrictions, public domain",
        ),
        Photo("chelsea", "chelsea.png", (300, 451), "Chelsea the cat; CC0 by the photographer, Stefan van der Walt"),
        Photo("coffee", "coffee.png", (400, 600), "Coffee cup, courtesy of Pikolo Espresso Bar; CC0, Rachel Michetti"),
        Photo("rocket", "rocket.jpg", (427, 640), "DSCOVR launch on Falcon 9, SpaceX Photos; public domain"),
        Photo(
            "hubble_deep_field",
            "hubble_deep_field.jpg",
            (872, 1000),
            "Hubble eXtreme Deep Field, NASA / HubbleSite; may be freely used, public domain",
        ),
        Photo(
            "immunohistochemistry",
            "ihc.png",
            (512, 512),
            "IHC-stained colonic glands, Center for Microscopy And Molecular Imaging (CMMI); no known copyright",
        ),
        Photo(
            "retina",
            "retina.jpg",
            (1411, 1411),
            "Fundus photograph of a normal left eye, Mikael Haggstrom, Wikimedia Commons; CC0 1.0",
        ),
    )
}
"""The colour photographs used, with their credits as scikit-image documents them."""

TRAIN_PHOTOS: tuple[str, ...] = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
VAL_PHOTOS: tuple[str, ...] = ("chelsea", "coffee")


def load_photo(name: str) -> Image.Image | None:
    """Read one bundled photo as an RGB PIL image from the installed scikit-image, or None when its file is missing.

    Raises:
        KeyError: ``name`` is not in :data:`PHOTOS`.
        ImportError: scikit-image is not installed.
    """
    if name not in PHOTOS:
        raise KeyError(f"unknown embedded photo {name!r}; expected one of {sorted(PHOTOS)}")
    try:
        data_dir = importlib.resources.files("skimage") / "data"
    except ModuleNotFoundError as error:
        raise ImportError(
            "the embedded dataset reads photos bundled with scikit-image: pip install 'fvq[data]' "
            "(or scikit-image), or use a folder or shard dataset"
        ) from error
    path = data_dir / PHOTOS[name].filename
    if not path.is_file():
        logger.warning("embedded photo %s (%s) is missing from this scikit-image install; skipped", name, path)
        return None
    return decode_image(path.read_bytes(), name=str(path)).image


class EmbeddedPhotos(Dataset):
    """Random (train) or fixed (val) square crops of the bundled photographs; needs no download.

    Args:
        split: ``"train"`` or ``"val"`` (held-out photos).
        image_size: Crop size in pixels.
        base_size: Base short side s: each crop comes from the photo resized to a short side in [s, 1.25 s].
            Defaults to ``4 * image_size``.
        samples_per_epoch: Length of a training epoch (crops are drawn afresh every epoch).
        val_samples: Number of fixed validation crops.
        seed: Seed of the training crops (``sample_rng(seed, epoch, index)``).
        val_seed: Seed of the validation crops; keep the default so that numbers stay comparable across runs.
        scale_range: (lo, hi) range of the short side relative to ``base_size``.
        photos: Override the photo names of this split (must be keys of :data:`PHOTOS`).

    Each item is ``ImageSample(image (3, S, S) float32 in [-1, 1], label)`` with S = ``image_size`` and the label
    the photo's position in :data:`PHOTOS`.
    """

    def __init__(
        self,
        split: str = "train",
        *,
        image_size: int = 32,
        base_size: int | None = None,
        samples_per_epoch: int = 8192,
        val_samples: int = 1024,
        seed: int = 0,
        val_seed: int = 0,
        scale_range: tuple[float, float] = (1.0, 1.25),
        photos: tuple[str, ...] | None = None,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if base_size is None:
            base_size = 4 * image_size
        if base_size < image_size:
            raise ValueError(f"base_size must be >= image_size ({image_size}), got {base_size}")
        length = samples_per_epoch if split == "train" else val_samples
        if length < 1:
            raise ValueError(f"{'samples_per_epoch' if split == 'train' else 'val_samples'} must be >= 1, got {length}")
        names = tuple(photos) if photos is not None else (TRAIN_PHOTOS if split == "train" else VAL_PHOTOS)
        unknown = [n for n in names if n not in PHOTOS]
        if unknown:
            raise ValueError(f"unknown embedded photos {unknown}; expected names from {sorted(PHOTOS)}")
        self.split = split
        self.image_size = int(image_size)
        self.base_size = int(base_size)
        self.seed = int(seed)
        self.val_seed = int(val_seed)
        self.length = int(length)
        self.crop = RandomResizedCropPaper(
            image_size, scale_range, flip_prob=0.5 if split == "train" else 0.0, base_size=self.base_size
        )
        self.photo_names: tuple[str, ...] = ()
        self.images: list[Image.Image] = []
        cache_short_side = 2 * self.base_size - 1
        for name in names:
            image = load_photo(name)
            if image is None:
                continue
            if min(image.size) > cache_short_side:
                image = resize_short_side(image, cache_short_side)
            self.photo_names += (name,)
            self.images.append(image)
        if not self.images:
            raise FileNotFoundError(
                f"none of the embedded {split} photos {list(names)} could be read from the installed scikit-image "
                "(skimage/data); reinstall scikit-image or use a folder dataset"
            )
        self._photo_labels = [list(PHOTOS).index(name) for name in self.photo_names]
        self._epoch = SharedEpoch()
        self._resized: dict[tuple[int, int], Image.Image] = {}  # (photo, short side) -> resized photo

    def __len__(self) -> int:
        return self.length

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the training crops (no effect on val)."""
        self._epoch.set(epoch)

    def describe(self, index: int) -> tuple[str, CropParams]:
        """The photo name and crop parameters of item ``index`` at the current epoch (pure, no pixels)."""
        photo, params = self._draw(index)
        return self.photo_names[photo], params

    def _draw(self, index: int) -> tuple[int, CropParams]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} {self.split} crops")
        if self.split == "train":
            rng = sample_rng(self.seed, self.epoch, index)
            photo = int(rng.integers(len(self.images)))
        else:
            rng = sample_rng(self.val_seed, index)
            photo = index % len(self.images)
        return photo, self.crop.sample_params(self.images[photo].size, rng)

    def __getitem__(self, index: int) -> ImageSample:
        photo, params = self._draw(index)
        key = (photo, params.short_side)
        resized = self._resized.get(key)
        if resized is None:  # a few dozen sizes per photo: resize each once, not once per crop
            resized = self._resized[key] = self.crop.resize(self.images[photo], params.short_side)
        crop = self.crop.crop_resized(resized, params)
        return make_sample(to_tensor(crop), self._photo_labels[photo])  # image: (3, S, S)
