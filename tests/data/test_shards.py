"""Tar shards: pattern expansion, writer/reader round trip, rank x worker splitting, labels, bad samples."""

from __future__ import annotations

import io
import tarfile
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from fvq.data.images import TooManyBadFilesError
from fvq.data.shards import (
    ShardDataset,
    ShardWriter,
    expand_urls,
    iter_tar_samples,
    split_key,
    write_shards_from_folder,
)
from fvq.data.transforms import EvalCrop, RandomResizedCropPaper


def _colour_id(image: torch.Tensor) -> int:
    """Identify a sample by its (uniform) colour: images below are filled with colour code i."""
    value = ((image[:, 0, 0] + 1) * 127.5).round().long()
    return int(value[0]) * 256 + int(value[1])


def _write_coded_shards(tmp_path, imgs, count: int, per_shard: int, labels: bool = True):
    """Shards of solid-colour PNGs whose colour encodes the sample number, so samples can be identified."""
    from PIL import Image

    with ShardWriter(tmp_path / "shards", prefix="train", samples_per_shard=per_shard) as writer:
        for i in range(count):
            buffer = io.BytesIO()
            Image.new("RGB", (12, 10), (i // 256, i % 256, 7)).save(buffer, format="PNG")
            files = {"png": buffer.getvalue()}
            if labels:
                files["cls"] = str(i % 5).encode()
            writer.write(f"s{i:05d}", files)
    return writer.paths


def test_split_key_and_brace_expansion(tmp_path):
    assert split_key("dir/abc.seg.PNG") == ("dir/abc", "seg.png")
    assert split_key("x.jpg") == ("x", "jpg")
    for name in ["d-000.tar", "d-001.tar", "d-002.tar", "e-a.tar", "e-b.tar"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.split("/")[-1] for p in expand_urls(f"{tmp_path}/d-{{000..002}}.tar")] == [
        "d-000.tar",
        "d-001.tar",
        "d-002.tar",
    ]
    assert len(expand_urls(f"{tmp_path}/e-{{a,b}}.tar::{tmp_path}/d-00*.tar")) == 5
    assert len(expand_urls(tmp_path)) == 5
    with pytest.raises(FileNotFoundError, match="matched no file"):
        expand_urls(f"{tmp_path}/d-{{000..003}}.tar")


def test_writer_reader_round_trip_with_labels(tmp_path, imgs):
    paths = _write_coded_shards(tmp_path, imgs, count=23, per_shard=10)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    samples = list(iter_tar_samples(str(paths[0])))
    assert [s.key for s in samples] == [f"s{i:05d}" for i in range(10)]
    assert set(samples[0].files) == {"png", "cls"}
    dataset = ShardDataset(f"{tmp_path}/shards/train-{{000000..000002}}.tar", transform=EvalCrop(8), labels=True)
    dataset.shuffle = False
    items = list(dataset)
    assert [_colour_id(s.image) for s in items] == list(range(23))
    assert [int(s.label) for s in items] == [i % 5 for i in range(23)]
    assert items[0].image.shape == (3, 8, 8)


def test_writer_output_is_reproducible(tmp_path, good_folder):
    first = write_shards_from_folder(good_folder, tmp_path / "a", samples_per_shard=4, labels=True)
    second = write_shards_from_folder(good_folder, tmp_path / "b", samples_per_shard=4, labels=True)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    labels = sorted(int(s.files["cls"]) for p in first for s in iter_tar_samples(str(p)))
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("per_shard", [3, 20])  # 8 shards (split by shard) and 2 shards (split by sample)
def test_every_sample_exactly_once_across_ranks_and_workers(tmp_path, imgs, per_shard):
    _write_coded_shards(tmp_path, imgs, count=40, per_shard=per_shard, labels=False)
    seen: Counter[int] = Counter()
    for rank in range(2):
        dataset = ShardDataset(
            f"{tmp_path}/shards/*.tar", transform=RandomResizedCropPaper(8), rank=rank, world_size=2, shuffle_buffer=5
        )
        dataset.set_epoch(3)
        loader = DataLoader(dataset, batch_size=4, num_workers=2, multiprocessing_context="fork")
        for batch in loader:
            seen.update(_colour_id(image) for image in batch.image)
    assert seen == Counter(range(40))


def test_epoch_changes_order_and_is_reproducible(tmp_path, imgs):
    _write_coded_shards(tmp_path, imgs, count=30, per_shard=5, labels=False)

    def order(epoch: int) -> list[int]:
        dataset = ShardDataset(f"{tmp_path}/shards/*.tar", transform=EvalCrop(8), shuffle_buffer=8, seed=1)
        dataset.set_epoch(epoch)
        return [_colour_id(s.image) for s in dataset]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(1)) == list(range(30))


def test_samples_per_epoch_equalises_ranks_and_resume_skips(tmp_path, imgs):
    _write_coded_shards(tmp_path, imgs, count=10, per_shard=2, labels=False)
    per_rank = []
    for rank in range(3):
        dataset = ShardDataset(
            f"{tmp_path}/shards/*.tar", transform=EvalCrop(8), samples_per_epoch=24, rank=rank, world_size=3
        )
        assert len(dataset) == 8
        per_rank.append([_colour_id(s.image) for s in dataset])
    assert [len(ids) for ids in per_rank] == [8, 8, 8]  # more than one pass over this rank's shards
    dataset = ShardDataset(
        f"{tmp_path}/shards/*.tar", transform=EvalCrop(8), samples_per_epoch=24, rank=0, world_size=3
    )
    dataset.set_epoch(0, skip_batches=3, batch_size=2)
    assert [_colour_id(s.image) for s in dataset] == per_rank[0][6:]


def test_bad_samples_and_truncated_shards_are_counted(tmp_path, imgs):
    paths = _write_coded_shards(tmp_path, imgs, count=20, per_shard=10, labels=False)
    broken = imgs.write_broken(tmp_path / "broken")
    with ShardWriter(tmp_path / "shards", prefix="zbad", samples_per_shard=10) as writer:
        for name, path in broken.items():
            writer.write(name, {path.suffix.lstrip("."): path.read_bytes()})
        writer.write("nometa", {"json": b"{}"})
    truncated = tmp_path / "shards" / "ztrunc-000000.tar"
    truncated.write_bytes(paths[0].read_bytes()[:3000])
    dataset = ShardDataset(f"{tmp_path}/shards/*.tar", transform=EvalCrop(8), max_bad_fraction=0.5)
    dataset.shuffle = False
    items = list(dataset)
    assert len(items) >= 20  # the good samples, plus those read before the truncation point
    assert dataset.bad_files.num_bad == 4 + 1 + 1  # 4 broken images, 1 sample without image, 1 truncated tar
    strict = ShardDataset(f"{tmp_path}/shards/*.tar", transform=EvalCrop(8), max_bad_fraction=0.01)
    strict.bad_files.min_seen = 5
    with pytest.raises(TooManyBadFilesError):
        list(strict)


def test_missing_label_is_a_bad_sample(tmp_path, imgs):
    _write_coded_shards(tmp_path, imgs, count=4, per_shard=4, labels=False)
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as archive:
        assert len(archive.getnames()) == 4
    dataset = ShardDataset(f"{tmp_path}/shards/*.tar", transform=EvalCrop(8), labels=True, max_bad_fraction=1.0)
    assert list(dataset) == [] and dataset.bad_files.num_bad == 4
