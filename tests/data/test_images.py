"""Decoding, mode conversion and the bad-file policy, on real files written in the test."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fvq.data.images import BadFilePolicy, BadImageError, TooManyBadFilesError, decode_image, to_rgb


def test_rgb_files_decode_unchanged(tmp_path, imgs):
    array = imgs.rgb_array(20, 30, seed=1)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    decoded = decode_image(path)
    assert decoded.image.mode == "RGB" and not decoded.converted and decoded.source_mode == "RGB"
    np.testing.assert_array_equal(np.asarray(decoded.image), array)


def test_sixteen_bit_gray_png_is_scaled_not_clipped(tmp_path, imgs):
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    path.write_bytes(imgs.png16(values, color_type=0))
    decoded = decode_image(path)
    assert decoded.source_mode.startswith("I") and decoded.converted
    out = np.asarray(decoded.image)
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)  # [0, 1, 4, 128, 255]
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    # PIL's own conversion clips everything above 255 to white: ours must not.
    assert np.asarray(Image.open(path).convert("L"))[0, 2] == 255 and out[0, 2, 0] == 4


def test_sixteen_bit_rgb_png_keeps_high_byte(tmp_path, imgs):
    values = np.array([[[0, 32768, 65535], [1000, 256, 65280]]], dtype=np.uint16)
    path = tmp_path / "rgb16.png"
    path.write_bytes(imgs.png16(values, color_type=2))
    out = np.asarray(decode_image(path).image)
    np.testing.assert_array_equal(out, (values >> 8).astype(np.uint8))


def test_cmyk_jpeg_becomes_rgb(tmp_path, imgs):
    array = imgs.rgb_array(32, 32, seed=2)
    path = tmp_path / "print.jpg"
    Image.fromarray(array).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    decoded = decode_image(path)
    assert decoded.image.mode == "RGB" and decoded.converted and decoded.source_mode == "CMYK"
    error = np.abs(np.asarray(decoded.image).astype(int) - array.astype(int)).mean()
    assert error < 12, f"CMYK round trip drifted by {error:.1f} levels on average"


@pytest.mark.parametrize("mode", ["L", "1", "P", "LA"])
def test_grayscale_and_palette_modes(tmp_path, imgs, mode):
    array = imgs.rgb_array(16, 16, seed=3)
    path = tmp_path / f"{mode}.png"
    Image.fromarray(array).convert(mode).save(path)
    decoded = decode_image(path)
    assert decoded.image.mode == "RGB" and decoded.converted and decoded.image.size == (16, 16)
    if mode in ("L", "1", "LA"):
        out = np.asarray(decoded.image)
        np.testing.assert_array_equal(out[..., 0], out[..., 1])


def test_rgba_composited_on_white_or_dropped(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red channel
    rgba[0, 0, 3] = 0  # fully transparent
    rgba[0, 1, 3] = 255  # opaque
    rgba[1, :, 3] = 128  # half
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    white = np.asarray(decode_image(path).image).astype(int)
    np.testing.assert_array_equal(white[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(white[0, 1], [200, 0, 0])
    assert abs(white[1, 0, 1] - 127) <= 1 and abs(white[1, 0, 0] - 228) <= 1
    dropped = np.asarray(decode_image(path, alpha="drop").image)
    np.testing.assert_array_equal(dropped[0, 0], [200, 0, 0])


def test_float_mode_rules():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(np.asarray(to_rgb(unit)[0])[0, :, 0], [0, 128, 255])
    bytes_range = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(np.asarray(to_rgb(bytes_range)[0])[0, :, 0], [0, 100, 255])


def test_bad_files_raise_bad_image_error(tmp_path, imgs):
    broken = imgs.write_broken(tmp_path)
    for path in broken.values():
        with pytest.raises(BadImageError, match="notes.png|empty|truncated|noise"):
            decode_image(path)
    with pytest.raises(BadImageError, match="empty"):
        decode_image(b"", name="mem")
    good = imgs.jpeg_bytes(imgs.rgb_array(8, 8, 0))
    assert decode_image(io.BytesIO(good)).image.size == (8, 8)


def test_policy_counts_logs_and_stops(caplog):
    policy = BadFilePolicy(max_bad_fraction=0.1, min_seen=10)
    with caplog.at_level(logging.WARNING, logger="fvq.data.images"):
        policy.record_bad("/data/x.jpg", "broken")  # 1 of 1, but below min_seen: no error yet
    assert "/data/x.jpg" in caplog.text
    for _ in range(8):
        policy.record_ok(converted=False)
    policy.record_ok(converted=True)
    assert (policy.num_seen, policy.num_bad, policy.num_converted) == (10, 1, 1)
    assert policy.stats.bad_fraction == pytest.approx(0.1)  # exactly at the limit is allowed
    with pytest.raises(TooManyBadFilesError, match=r"2 of 11 .* max_bad_fraction=0.1"):
        policy.record_bad("/data/y.jpg", "broken")


def test_policy_zero_fraction_stops_at_first_bad_file():
    policy = BadFilePolicy(max_bad_fraction=0.0, min_seen=1)
    policy.record_ok(converted=False)
    with pytest.raises(TooManyBadFilesError):
        policy.record_bad("f.png", "bad")
    with pytest.raises(ValueError, match="max_bad_fraction"):
        BadFilePolicy(max_bad_fraction=1.5)


def test_batch_images_finds_the_images_of_every_batch_form():
    from fvq.data.images import ImageSample, batch_images

    images = torch.zeros(2, 3, 4, 4)
    for batch in (images, ImageSample(images, torch.zeros(2)), {"image": images}, [images, None]):
        assert batch_images(batch) is images
    with pytest.raises(TypeError, match="cannot find images in a batch of type int"):
        batch_images(3)
