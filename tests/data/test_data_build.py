"""build_dataset / build_loader: config validation, distributed sampling, exact mid-epoch resume."""

from __future__ import annotations

import pytest
import torch

from fvq.data.build import ResumableDistributedSampler, build_dataset, build_loader
from fvq.data.folder import ImageFolder
from fvq.data.shards import ShardDataset, write_shards_from_folder
from fvq.data.transforms import EvalCrop, RandomResizedCropPaper


def test_build_folder_dataset_uses_split_subfolders_and_transforms(tmp_path, imgs):
    for split, count in [("train", 3), ("val", 2)]:
        for i in range(count):
            imgs.write_good(tmp_path / split / "cls" / f"{i}.jpg", i)
    config = {"type": "folder", "path": str(tmp_path), "image_size": 16, "labels": True, "eval_crop": "fvq"}
    train = build_dataset(config, "train")
    val = build_dataset(config, "val")
    assert isinstance(train, ImageFolder) and len(train) == 3 and len(val) == 2
    assert isinstance(train.transform, RandomResizedCropPaper)
    assert isinstance(val.transform, EvalCrop) and val.transform.protocol == "fvq"
    assert val[0].image.shape == (3, 16, 16)


def test_build_shards_dataset_with_split_placeholder(tmp_path, good_folder):
    write_shards_from_folder(good_folder, tmp_path / "s", prefix="train", samples_per_shard=4)
    config = {"type": "shards", "path": f"{tmp_path}/s/{{split}}-{{000000..000002}}.tar", "image_size": 8}
    dataset = build_dataset(config, "train")
    assert isinstance(dataset, ShardDataset) and len(dataset.shards) == 3
    assert sum(1 for _ in dataset) == 9


def test_build_dataset_rejects_bad_configs(tmp_path):
    with pytest.raises(ValueError, match="unknown keys \\['imagesize'\\]"):
        build_dataset({"type": "embedded", "imagesize": 32}, "train")
    with pytest.raises(ValueError, match="'type' must be one of"):
        build_dataset({"type": "lmdb"}, "train")
    with pytest.raises(ValueError, match="needs 'path'"):
        build_dataset({"type": "folder"}, "train")
    with pytest.raises(ValueError, match="image_size"):
        build_dataset({"type": "embedded", "image_size": 0}, "train")
    with pytest.raises(ValueError, match="split"):
        build_dataset({"type": "embedded"}, "holdout")


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_splits_each_epoch_across_ranks(drop_last):
    data = list(range(10))
    shares = [
        ResumableDistributedSampler(data, shuffle=True, seed=4, rank=r, world_size=3, drop_last=drop_last)
        for r in range(3)
    ]
    indices = [s.indices() for s in shares]
    flat = sorted(i for share in indices for i in share)
    if drop_last:
        assert [len(i) for i in indices] == [3, 3, 3] and len(set(flat)) == 9
    else:
        assert [len(i) for i in indices] == [4, 4, 4] and set(flat) == set(range(10))
    for s in shares:
        s.set_epoch(1)
    assert [s.indices() for s in shares] != indices


def test_loader_resume_mid_epoch_is_exact_regardless_of_workers(tmp_path, imgs):
    for i in range(14):
        imgs.write_good(tmp_path / f"{i:02d}.png", i)
    dataset = ImageFolder(tmp_path, transform=RandomResizedCropPaper(8), seed=2)
    loader = build_loader(dataset, 3, shuffle=True, seed=5, num_workers=0)
    loader.set_epoch(2)
    full = [batch.image for batch in loader]
    assert len(full) == 4  # 14 // 3 with drop_last

    resumed = build_loader(dataset, 3, shuffle=True, seed=5, num_workers=2)
    resumed.set_epoch(2, start_batch=2)
    rest = [batch.image for batch in resumed]
    assert len(rest) == 2
    for a, b in zip(full[2:], rest):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    loader.set_epoch(3)
    assert not torch.equal(torch.cat([b.image for b in loader]), torch.cat(full))


def test_embedded_default_config_and_loader():
    pytest.importorskip("skimage")
    train = build_dataset({"type": "embedded", "image_size": 16, "samples_per_epoch": 12}, "train")
    val = build_dataset({"type": "embedded", "image_size": 16}, "val")
    assert len(val) == 1024
    loader = build_loader(train, 4, shuffle=True, seed=0)
    batch = next(iter(loader))
    assert batch.image.shape == (4, 3, 16, 16) and batch.label.shape == (4,)
    assert loader.bad_files is None
