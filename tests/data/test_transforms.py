"""Training augmentation and evaluation crops: shapes, value range, determinism, protocol behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fvq.data.transforms import (
    EvalCrop,
    RandomResizedCropPaper,
    center_crop_fvq,
    center_crop_llamagen,
    resize_short_side,
    sample_rng,
    to_pil,
    to_tensor,
)


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def test_to_tensor_range_and_inverse():
    image = Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8))
    tensor = to_tensor(image)
    assert tensor.shape == (3, 1, 1) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor.flatten(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))
    picture = _picture(9, 7)
    np.testing.assert_array_equal(np.asarray(to_pil(to_tensor(picture))), np.asarray(picture))


@pytest.mark.parametrize("size,picture_size", [(32, (96, 70)), (16, (16, 40)), (24, (300, 30))])
def test_paper_crop_shape_range_and_short_side(size, picture_size):
    crop = RandomResizedCropPaper(size)
    picture = _picture(*picture_size)
    short_sides = set()
    for index in range(40):
        params = crop.sample_params(picture.size, sample_rng(0, 0, index))
        assert size <= params.short_side <= int(np.ceil(1.25 * size))
        short_sides.add(params.short_side)
        out = to_tensor(crop.apply(picture, params))
        assert out.shape == (3, size, size)
        assert out.min() >= -1 and out.max() <= 1
    assert len(short_sides) > 1, "short side should vary in [size, 1.25 size]"


def test_paper_crop_is_a_pure_function_of_the_generator_and_flips():
    crop = RandomResizedCropPaper(32)
    picture = _picture(80, 60, seed=1)
    a = np.asarray(crop(picture, sample_rng(7, 1, 5)))
    b = np.asarray(crop(picture, sample_rng(7, 1, 5)))
    np.testing.assert_array_equal(a, b)
    flips = [crop.sample_params(picture.size, sample_rng(7, 1, i)).flip for i in range(200)]
    assert 60 < sum(flips) < 140
    params = crop.sample_params(picture.size, sample_rng(7, 1, 0))
    unflipped = crop.apply(picture, type(params)(params.short_side, params.top, params.left, False))
    flipped = crop.apply(picture, type(params)(params.short_side, params.top, params.left, True))
    np.testing.assert_array_equal(np.asarray(flipped), np.asarray(unflipped)[:, ::-1])


def test_paper_crop_of_256_uses_short_sides_256_to_320():
    crop = RandomResizedCropPaper(256)
    sides = {crop.sample_params((500, 375), sample_rng(0, i)).short_side for i in range(2000)}
    assert min(sides) == 256 and max(sides) == 320


def test_llamagen_center_crop_resizes_short_side_then_centres():
    picture = Image.new("RGB", (200, 100), (0, 0, 0))
    picture.paste((255, 255, 255), (50, 0, 150, 100))  # white middle half
    out = center_crop_llamagen(picture, 50)
    assert out.size == (50, 50)
    assert np.asarray(out).min() >= 250  # the centre 50x50 of the 100x50 resize is all white


def test_fvq_center_crop_keeps_raw_pixels_and_handles_small_images():
    picture = _picture(64, 48, seed=2)
    out = center_crop_fvq(picture, 32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(picture)[8:40, 16:48])
    small = _picture(20, 10, seed=3)
    resized = center_crop_fvq(small, 16)
    assert resized.size == (16, 16)
    padded = np.asarray(center_crop_fvq(small, 16, small="pad"))
    assert padded.shape == (16, 16, 3)
    np.testing.assert_array_equal(padded[3:13, :], np.asarray(small)[:, 2:18])
    assert padded[:3].max() == 0 and padded[13:].max() == 0


def test_eval_crop_protocols_and_errors():
    picture = _picture(50, 40)
    assert EvalCrop(32, "llamagen")(picture).size == (32, 32)
    assert EvalCrop(32, "fvq")(picture).size == (32, 32)
    with pytest.raises(ValueError, match="protocol"):
        EvalCrop(32, "adm")
    with pytest.raises(ValueError, match="RGB"):
        center_crop_fvq(picture.convert("L"), 8)
    with pytest.raises(ValueError, match="scale_range"):
        RandomResizedCropPaper(32, scale_range=(0.5, 1.0))


def test_resize_short_side_keeps_aspect():
    assert resize_short_side(_picture(300, 200), 100).size == (150, 100)
    assert resize_short_side(_picture(200, 300), 100).size == (100, 150)
