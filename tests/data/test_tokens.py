"""Token stores and TokenDataset at the format level: stores written with write_shard/write_meta (no model), views
geometry checked against ADM's centre crop and torchvision's ten-crop written out here, reading errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fvq.data import build_loader
from fvq.data.tokens import (
    META_NAME,
    ForeignTokensError,
    TokenDataset,
    TokenSample,
    ViewCrops,
    ViewSpec,
    center_crop_adm,
    shard_files,
    storage_dtype,
    write_meta,
    write_shard,
)
from fvq.data.transforms import sample_rng

GRID = (3, 4)
T = GRID[0] * GRID[1]


def _settings(views: str, *, codebook_size: int = 50, classes: int = 3, codes: int = 1, shard_size: int = 4) -> dict:
    return {
        "model_identity": "weights+config",
        "codebook_size": codebook_size,
        "grid": list(GRID),
        "codes_per_position": codes,
        "dtype": storage_dtype(codebook_size).name,
        "image_size": 12,
        "protocol": "llamagen",
        "views": views,
        "labels": "subfolders" if classes else "none",
        "class_names": [f"class{c}" for c in range(classes)],
        "num_inputs": 0,
        "shard_size": shard_size,
    }


def write_store(path, counts, *, views="flip", seed=0, labels=None, tokens=None, **layout):
    """A store with ``counts[k]`` images in shard k: random ids, labels ``i % classes``; returns (tokens, labels) of
    all images, ``(N, V, h, w[, c])`` and ``(N,)``."""
    settings = _settings(views, **layout)
    spec = ViewSpec.parse(views)
    n, codes = sum(counts), settings["codes_per_position"]
    shape = (n, spec.count, *GRID, *((codes,) if codes > 1 else ()))
    rng = np.random.default_rng(seed)
    if tokens is None:
        tokens = rng.integers(0, settings["codebook_size"], size=shape)
    classes = len(settings["class_names"])
    if labels is None:
        labels = np.arange(n) % classes if classes else np.full(n, -1)
    entries, start = [], 0
    for index, count in enumerate(counts):
        part = slice(start, start + count)
        entries.append(
            write_shard(
                path,
                index,
                tokens=tokens[part].astype(settings["dtype"]),
                labels=np.asarray(labels[part]),
                sources=[f"class{labels[i] % max(classes, 1)}/{i}.png" for i in range(start, start + count)],
                skipped=["broken.png"] if count == 0 else [],
                first_input=start,
                inputs=max(count, 1),
                settings=settings,
            )
        )
        start += count
    write_meta(path, settings, entries)
    return tokens, np.asarray(labels)


# ---------------------------------------------------------------------------------------------------------------------
# views
def test_view_spec_parse_names_and_count():
    assert ViewSpec.parse("center").count == 1 and ViewSpec.parse("flip").names == ["center", "center-flip"]
    ten = ViewSpec.parse("tencrop")
    assert ten.scales == (1.1,) and ten.count == 10 and str(ten) == "tencrop"
    assert ten.names[:6] == ["1.1/center", "1.1/top-left", "1.1/top-right", "1.1/bottom-left", "1.1/bottom-right"] + [
        "1.1/center-flip"
    ]
    both = ViewSpec.parse("tencrop+1.05")
    assert both.scales == (1.1, 1.05) and both.count == 20 and str(both) == "tencrop+1.05"
    assert both.names[10] == "1.05/center"
    assert str(ViewSpec.parse("TENCROP@1.5+1.2")) == "tencrop@1.5+1.2"
    assert both.crop_size(256, 1.1) == 281 and both.crop_size(256, 1.05) == 268  # LlamaGen's int(S * scale)
    for bad in ("tencrop+0.9", "center+1.05", "fivecrop", "tencrop+x", "tencrop+1.1"):
        with pytest.raises(ValueError):
            ViewSpec.parse(bad)


def _adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr, from its description: BOX halving while the short side >= 2 size, BICUBIC
    by size / short side with each side rounded, centre crop with floor offsets."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def _torchvision_ten_crop(array: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision's TenCrop: (tl, tr, bl, br, center) of the image, then the same of its mirror; the centre crop's
    offset is int(round((H - size) / 2)) (Python rounds halves to even)."""

    def five(a: np.ndarray) -> list[np.ndarray]:
        height, width = a.shape[:2]
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        return [
            a[:size, :size],
            a[:size, width - size :],
            a[height - size :, :size],
            a[height - size :, width - size :],
            a[top : top + size, left : left + size],
        ]

    return five(array) + five(array[:, ::-1])


STORE_ORDER = [4, 0, 1, 2, 3, 9, 5, 6, 7, 8]  # torchvision's ten-crop positions of views 0..9


@pytest.mark.parametrize(("size", "shape"), [(16, (70, 37)), (16, (40, 61)), (8, (9, 8))])
def test_tencrop_views_are_llamagen_crops(size, shape):
    from skimage import data

    image = Image.fromarray(data.astronaut()).resize(shape, Image.Resampling.BILINEAR)
    for scale in (1.1, 1.05):
        np.testing.assert_array_equal(
            np.asarray(center_crop_adm(image, int(size * scale))), _adm_center_crop(image, int(size * scale))
        )
    views = ViewCrops("tencrop@1.2+1.5", size)(image)
    assert len(views) == 20 and all(v.size == (size, size) for v in views)
    for s, scale in enumerate((1.2, 1.5)):
        expected = _torchvision_ten_crop(_adm_center_crop(image, int(size * scale)), size)
        for view in range(10):
            np.testing.assert_array_equal(np.asarray(views[10 * s + view]), expected[STORE_ORDER[view]])
    # view 0 is the plain centre crop; view 5 the centre box of the mirrored image
    large = _adm_center_crop(image, int(size * 1.2))
    offset = int(round((large.shape[0] - size) / 2.0))
    np.testing.assert_array_equal(np.asarray(views[0]), large[offset : offset + size, offset : offset + size])
    np.testing.assert_array_equal(np.asarray(views[5]), large[:, ::-1][offset : offset + size, offset : offset + size])


def test_center_and_flip_views_use_the_protocol_crop():
    from skimage import data

    from fvq.data.transforms import EvalCrop

    image = Image.fromarray(data.coffee()).resize((40, 30))
    for protocol in ("llamagen", "fvq"):
        crop = np.asarray(EvalCrop(16, protocol)(image))
        center, mirrored = ViewCrops("flip", 16, protocol)(image)
        np.testing.assert_array_equal(np.asarray(center), crop)
        np.testing.assert_array_equal(np.asarray(mirrored), crop[:, ::-1])


def test_storage_dtype():
    assert storage_dtype(32) == np.uint16 and storage_dtype(2**16) == np.uint16
    assert storage_dtype(2**16 + 1) == np.int32 and storage_dtype(2**31) == np.int32
    assert storage_dtype(2**31 + 1) == np.int64


# ---------------------------------------------------------------------------------------------------------------------
# reading
def test_dataset_items_views_and_attributes(tmp_path):
    tokens, labels = write_store(tmp_path, [4, 4, 2], views="tencrop+1.05")
    data = TokenDataset(tmp_path, seed=3)
    assert len(data) == 10 and data.views == 20 and data.grid == GRID and data.codebook_size == 50
    assert data.num_classes == 3 and data.class_names == ["class0", "class1", "class2"]
    assert data.model_identity == "weights+config" and data.codes_per_position == 1
    assert data.view_names[0] == "1.1/center"
    for epoch in (0, 1, 7):
        data.set_epoch(epoch)
        for i in range(len(data)):
            sample = data[i]
            view = int(sample_rng(3, epoch, i).integers(20))  # a pure function of (seed, epoch, index)
            assert data.view_of(i) == view
            assert (
                isinstance(sample, TokenSample) and sample.tokens.dtype == torch.int64 and sample.tokens.shape == (T,)
            )
            assert torch.equal(sample.tokens, torch.from_numpy(tokens[i, view].reshape(-1)))  # raster order
            assert sample.label.shape == () and int(sample.label) == labels[i]
    data.set_epoch(1)
    first = [data.view_of(i) for i in range(10)]
    data.set_epoch(2)
    assert first != [data.view_of(i) for i in range(10)]  # another view per epoch
    data.set_epoch(1)
    assert first == [data.view_of(i) for i in range(10)]  # reproducible
    held_out = TokenDataset(tmp_path, split="val", seed=3)
    held_out.set_epoch(5)
    assert all(torch.equal(held_out[i].tokens, torch.from_numpy(tokens[i, 0].reshape(-1))) for i in range(10))
    with pytest.raises(IndexError):
        data[10]


def test_dataset_through_build_loader_with_workers(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50, size=(6, 2, *GRID))
    tokens[:, :, 0, 0] = np.arange(6)[:, None]  # the first token names the image, the second the view
    tokens[:, :, 0, 1] = np.arange(2)
    _, labels = write_store(tmp_path, [3, 3], views="flip", tokens=tokens)
    data = TokenDataset(tmp_path, seed=1)
    loader = build_loader(data, 2, shuffle=True, seed=0, num_workers=2, drop_last=False, persistent_workers=True)
    for epoch in (0, 1, 2):
        loader.set_epoch(epoch)  # reaches the dataset in the (persistent) workers
        seen = []
        for batch in loader:
            assert isinstance(batch, TokenSample) and batch.tokens.shape == (2, T) and batch.label.shape == (2,)
            for row, label in zip(batch.tokens.numpy(), batch.label.tolist()):
                image, view = int(row[0]), int(row[1])
                assert view == int(sample_rng(1, epoch, image).integers(2)) and label == labels[image]
                assert np.array_equal(row, tokens[image, view].reshape(-1))
                seen.append(image)
        assert sorted(seen) == list(range(6))


def test_shards_are_memory_mapped_when_first_read(tmp_path, monkeypatch):
    write_store(tmp_path, [4, 4, 4], views="flip")
    loads = []
    real_load = np.load

    def spy(path, *args, **kwargs):
        loads.append((str(path).rsplit("/", 1)[-1], kwargs.get("mmap_mode")))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(np, "load", spy)
    data = TokenDataset(tmp_path)
    assert data.store.open_shards == [] and not any(name.startswith("tokens") for name, _ in loads)
    data[9]
    assert data.store.open_shards == [2] and ("tokens-00002.npy", "r") in loads
    assert isinstance(data.store.tokens(2), np.memmap)
    copy = pickle.loads(pickle.dumps(data))  # what DataLoader workers get under spawn: no maps, no data
    assert copy.store.open_shards == [] and len(pickle.dumps(data)) < 4000
    assert torch.equal(copy[9].tokens, data[9].tokens)


def test_empty_shards_and_several_codes_per_position(tmp_path):
    tokens, _ = write_store(tmp_path, [2, 0, 3], views="center", codes=2, classes=0)
    data = TokenDataset(tmp_path)
    assert len(data) == 5 and data.num_classes == 0 and data.codes_per_position == 2
    assert data[2].tokens.shape == (T, 2) and int(data[2].label) == -1
    assert torch.equal(data[2].tokens, torch.from_numpy(tokens[2, 0].reshape(T, 2)))
    assert data.store.skipped() == ["broken.png"]
    with pytest.raises(ValueError, match="no class labels"):
        TokenDataset(tmp_path, require_labels=True)


def test_version_1_files_read_as_one_view_without_labels(tmp_path):
    from fvq.inference import TokenFile, save_tokens

    ids = torch.randint(0, 64, (3, *GRID))
    save_tokens(tmp_path / "t.safetensors", TokenFile(indices=ids, codebook_size=64, model_identity="a+b"))
    data = TokenDataset(tmp_path / "t.safetensors")
    assert (len(data), data.views, data.num_classes, data.codebook_size, data.grid) == (3, 1, 0, 64, GRID)
    data.set_epoch(3)
    assert torch.equal(data[1].tokens, ids[1].reshape(-1)) and int(data[1].label) == -1
    assert torch.equal(pickle.loads(pickle.dumps(data))[2].tokens, ids[2].reshape(-1))


def test_foreign_model_identity(tmp_path):
    write_store(tmp_path, [2])
    data = TokenDataset(tmp_path)
    data.check_model_identity("weights+config")
    with pytest.raises(ForeignTokensError, match="made by model weights\\+config but the model given is other"):
        data.check_model_identity("other")


def test_reading_errors_name_the_shard(tmp_path):
    write_store(tmp_path, [2, 2, 2])
    tokens_1 = tmp_path / shard_files(1)[0]
    original = tokens_1.read_bytes()
    tokens_1.write_bytes(original[:-4])  # truncated
    with pytest.raises(ValueError, match="tokens-00001.npy has .* bytes"):
        TokenDataset(tmp_path)
    damaged = bytearray(original)
    damaged[-1] ^= 0xFF  # same size, other bytes
    tokens_1.write_bytes(bytes(damaged))
    TokenDataset(tmp_path)  # sizes only, by default
    with pytest.raises(ValueError, match="tokens-00001.npy does not match its SHA-256"):
        TokenDataset(tmp_path, verify="sha256")
    tokens_1.unlink()
    with pytest.raises(FileNotFoundError, match="shard 1 file tokens-00001.npy is missing"):
        TokenDataset(tmp_path)
    tokens_1.write_bytes(original)
    TokenDataset(tmp_path, verify="sha256")

    meta = json.loads((tmp_path / META_NAME).read_text())
    (tmp_path / META_NAME).write_text(json.dumps({**meta, "version": 3}))
    with pytest.raises(ValueError, match="format version 3; this fvq reads version 2"):
        TokenDataset(tmp_path)
    (tmp_path / META_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="no meta.json.*--resume"):
        TokenDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        TokenDataset(tmp_path / "missing")


def test_out_of_range_labels_and_ids(tmp_path):
    write_store(tmp_path / "labels", [2, 2], labels=np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"class ids in \[0, 2\] \(3 classes\); 1 are not, the first 3 at image 3"):
        TokenDataset(tmp_path / "labels")
    tokens = np.zeros((4, 2, *GRID), dtype=np.int64)
    tokens[3, 1, 2, 1] = 50  # codebook_size 50
    write_store(tmp_path / "ids", [2, 2], tokens=tokens)
    data = TokenDataset(tmp_path / "ids", split="val")
    assert int(data[3].tokens.max()) == 0  # view 0 is clean
    data = TokenDataset(tmp_path / "ids", seed=0)
    bad_epoch = next(e for e in range(50) if int(sample_rng(0, e, 3).integers(2)) == 1)
    data.set_epoch(bad_epoch)
    with pytest.raises(
        ValueError, match=r"ids must lie in \[0, 49\].*image 3 .*tokens-00001.npy row 1 \(class0/3.png\)"
    ):
        data[3]
