"""The embedded photo dataset: offline, split by photograph, deterministic."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("skimage")

from fvq.data.embedded import PHOTOS, TRAIN_PHOTOS, VAL_PHOTOS, EmbeddedPhotos, load_photo  # noqa: E402


def test_every_photo_ships_with_scikit_image_and_is_colour():
    for name, photo in PHOTOS.items():
        image = load_photo(name)
        assert image is not None, f"{name} missing from the installed scikit-image"
        assert image.mode == "RGB" and image.size == (photo.size[1], photo.size[0])


def test_train_and_val_are_disjoint_by_photo():
    assert not set(TRAIN_PHOTOS) & set(VAL_PHOTOS)
    assert set(TRAIN_PHOTOS) | set(VAL_PHOTOS) == set(PHOTOS)
    train = EmbeddedPhotos("train", samples_per_epoch=64)
    val = EmbeddedPhotos("val", val_samples=16)
    train_sources = {train.describe(i)[0] for i in range(64)}
    val_sources = {val.describe(i)[0] for i in range(16)}
    assert train_sources <= set(TRAIN_PHOTOS) and len(train_sources) > 1
    assert val_sources == set(VAL_PHOTOS)
    train_labels = {int(train[i].label) for i in range(16)}
    val_labels = {int(val[i].label) for i in range(16)}
    assert not train_labels & val_labels


def test_val_crops_are_fixed_across_instances_seeds_and_epochs():
    a = EmbeddedPhotos("val", val_samples=8, seed=0)
    b = EmbeddedPhotos("val", val_samples=8, seed=123)
    b.set_epoch(5)
    first = torch.stack([a[i].image for i in range(8)])
    torch.testing.assert_close(torch.stack([b[i].image for i in range(8)]), first, rtol=0, atol=0)
    assert not torch.equal(first[0], first[2])  # distinct crops
    assert all(not a.describe(i)[1].flip for i in range(8))


def test_train_crops_depend_on_seed_epoch_index_only():
    a = EmbeddedPhotos("train", image_size=16, samples_per_epoch=10, seed=1)
    b = EmbeddedPhotos("train", image_size=16, samples_per_epoch=10, seed=1)
    sample = a[3].image
    assert sample.shape == (3, 16, 16) and sample.min() >= -1 and sample.max() <= 1
    torch.testing.assert_close(b[3].image, sample, rtol=0, atol=0)
    a.set_epoch(1)
    assert not torch.equal(a[3].image, sample)
    assert len(a) == 10


def test_base_size_sets_crop_scale_and_errors():
    dataset = EmbeddedPhotos("train", image_size=32, base_size=64, samples_per_epoch=50)
    sides = {dataset.describe(i)[1].short_side for i in range(50)}
    assert min(sides) >= 64 and max(sides) <= 80
    with pytest.raises(ValueError, match="split"):
        EmbeddedPhotos("test")
    with pytest.raises(ValueError, match="unknown embedded photos"):
        EmbeddedPhotos("train", photos=("lena",))
    with pytest.raises(ValueError, match="base_size"):
        EmbeddedPhotos("train", image_size=64, base_size=32)


def test_cached_resizes_give_the_same_crops_as_resizing_each_time():
    from fvq.data.transforms import to_tensor

    ds = EmbeddedPhotos("train", samples_per_epoch=48)
    for i in range(48):  # many crops share a (photo, short side): later ones come from the cache
        name, params = ds.describe(i)
        fresh = to_tensor(ds.crop.apply(ds.images[ds.photo_names.index(name)], params))
        assert torch.equal(ds[i].image, fresh)
    assert 0 < len(ds._resized) < 48
