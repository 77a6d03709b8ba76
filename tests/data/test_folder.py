"""Image folders: scanning, labels, bad files replaced and counted, the stop rule, counts across workers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from fvq.data.folder import EmptyDatasetError, ImageFolder, scan_images
from fvq.data.images import TooManyBadFilesError
from fvq.data.transforms import EvalCrop, RandomResizedCropPaper


def test_imagenet_layout_labels_and_sorted_listing(good_folder):
    dataset = ImageFolder(good_folder, transform=EvalCrop(16), labels=True)
    assert dataset.classes == ["ant", "bee", "cat"]
    assert len(dataset) == 9
    assert dataset.paths == sorted(dataset.paths)
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample.image.shape == (3, 16, 16) and sample.image.dtype == torch.float32
        assert -1 <= sample.image.min() and sample.image.max() <= 1
        expected = dataset.classes.index(dataset.paths[index].split("/")[-2])
        assert int(sample.label) == expected
    unlabelled = ImageFolder(good_folder, transform=EvalCrop(16))
    assert set(unlabelled.labels) == {-1} and int(unlabelled[0].label) == -1


def test_extensions_are_case_insensitive_and_hidden_files_skipped(tmp_path, imgs):
    imgs.write_good(tmp_path / "A.JPG", 0)
    imgs.write_good(tmp_path / "b.JpEg", 1)
    imgs.write_good(tmp_path / "sub" / "c.WEBP", 2)
    imgs.write_good(tmp_path / "._d.jpg", 3)
    (tmp_path / "readme.txt").write_text("x")
    paths, labels, classes = scan_images(tmp_path)
    assert [p.split("/")[-1] for p in paths] == ["A.JPG", "b.JpEg", "c.WEBP"]
    assert classes == [] and labels == [-1, -1, -1]


def test_empty_and_missing_folders_raise_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(EmptyDatasetError, match=r"no images found in .*empty.*\.jpg, \.jpeg, \.png, \.webp"):
        ImageFolder(tmp_path / "empty", transform=EvalCrop(8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nowhere", transform=EvalCrop(8))


def _mixed_folder(root, imgs, good: int):
    for i in range(good):
        imgs.write_good(root / f"good{i:03d}.png", i)
    imgs.write_broken(root / "zz_broken")  # sorted last: 4 bad files
    # converted files: 16-bit gray, CMYK, RGBA
    import numpy as np
    from PIL import Image

    (root / "gray16.png").write_bytes(imgs.png16(np.full((20, 20), 40000, dtype=np.uint16), color_type=0))
    Image.fromarray(imgs.rgb_array(20, 20, 5)).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(imgs.rgb_array(20, 20, 6)).convert("RGBA").save(root / "rgba.png")


def test_bad_files_are_replaced_counted_and_converted_files_counted(tmp_path, imgs):
    _mixed_folder(tmp_path, imgs, good=400)
    dataset = ImageFolder(tmp_path, transform=EvalCrop(8), max_bad_fraction=0.05)
    assert len(dataset) == 400 + 3 + 4
    batch = [dataset[i] for i in range(len(dataset))]
    assert all(s.image.shape == (3, 8, 8) for s in batch)  # every index yields a sample
    stats = dataset.bad_files.stats
    assert stats.bad == 4
    assert stats.converted == 3
    assert stats.seen == len(dataset)  # replacements are not counted twice


def test_too_many_bad_files_stop_with_a_clear_error(tmp_path, imgs):
    _mixed_folder(tmp_path, imgs, good=20)
    dataset = ImageFolder(tmp_path, transform=EvalCrop(8), max_bad_fraction=0.01)
    with pytest.raises(TooManyBadFilesError, match=r"of \d+ image files read .* above max_bad_fraction=0.01"):
        for i in range(len(dataset)):
            dataset[i]


def test_all_files_bad_stops(tmp_path, imgs):
    imgs.write_broken(tmp_path)
    dataset = ImageFolder(tmp_path, transform=EvalCrop(8), max_bad_fraction=1.0, max_retries=3)
    with pytest.raises(TooManyBadFilesError, match="consecutive files"):
        dataset[0]


def test_counters_include_dataloader_workers(tmp_path, imgs):
    _mixed_folder(tmp_path, imgs, good=60)
    dataset = ImageFolder(tmp_path, transform=RandomResizedCropPaper(8), max_bad_fraction=0.1)
    loader = DataLoader(dataset, batch_size=7, num_workers=2, multiprocessing_context="fork")
    images = torch.cat([batch.image for batch in loader])
    assert images.shape == (len(dataset), 3, 8, 8)
    assert dataset.bad_files.num_bad == 4 and dataset.bad_files.num_converted == 3


def test_augmentation_is_a_function_of_seed_epoch_index(good_folder):
    dataset = ImageFolder(good_folder, transform=RandomResizedCropPaper(16), seed=3)
    first = dataset[4].image
    torch.testing.assert_close(dataset[4].image, first, rtol=0, atol=0)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[4].image, first)
    dataset.set_epoch(0)
    torch.testing.assert_close(dataset[4].image, first, rtol=0, atol=0)
