"""``fvq encode --out DIR``: token stores with class labels and LlamaGen's views, through the real CLI and the library,
checked against crops encoded one by one; resume after an interruption; two gloo processes; decoding view 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fvq.inference.pipeline as pipeline
from fvq.cli import main
from fvq.data.tokens import ForeignTokensError, TokenDataset
from fvq.data.transforms import EvalCrop
from fvq.inference import check_tokens, encode_store, load_model, load_tokens, model_identity
from fvq.models import Tokenizer

SIZE = 16  # tiny_f4: 4 x 4 tokens
CONFIG = {"model": {"preset": "tiny_f4"}, "quantizer": {"type": "vq", "codebook_size": 32, "codebook_dim": 8}}
STORE_ORDER = [4, 0, 1, 2, 3, 9, 5, 6, 7, 8]  # torchvision's ten-crop positions of views 0..9


def _tokenizer(seed: int, **quantizer) -> Tokenizer:
    torch.manual_seed(seed)
    return Tokenizer.from_config({**CONFIG, "quantizer": {**CONFIG["quantizer"], **quantizer}}).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two models, and an ImageNet-style folder: 3 classes of photos of assorted sizes, a broken file, a loose file."""
    from skimage import data

    root = tmp_path_factory.mktemp("encode_views")
    _tokenizer(0).save_pretrained(root / "model")
    _tokenizer(1).save_pretrained(root / "other")
    images = root / "images"
    photos = {"n02_coffee": data.coffee(), "n01_cat": data.chelsea(), "n03_astronaut": data.astronaut()}
    sizes = [(23, 19), (40, 31), (70, 36)]  # the last is halved (BOX) before the bicubic resize
    for c, (name, photo) in enumerate(sorted(photos.items())):
        for j, size in enumerate(sizes[: 2 + (c == 0)]):
            (images / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo).resize(size, Image.Resampling.BILINEAR).save(images / name / f"img{j}.png")
    (images / "n01_cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(data.coffee()).resize((20, 20)).save(images / "loose.png")  # not in a class folder: ignored
    reference = root / "reference"
    args = ["encode", str(images), "--model", str(root / "model"), "--out", str(reference), "--image-size", "16"]
    assert main([*args, "--views", "flip", "--labels", "subfolders", "--shard-size", "3", "--no-progress"]) == 0
    return {"root": root, "images": images, "model": root / "model", "other": root / "other", "reference": reference}


def _files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir())}


def _adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr, from its description (see tests/data/test_tokens.py)."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def _five_crops(array: np.ndarray, size: int) -> list[np.ndarray]:
    """torchvision's FiveCrop: tl, tr, bl, br, centre at int(round((side - size) / 2))."""
    side = array.shape[0]
    c, far = int(round((side - size) / 2.0)), side - size
    return [array[t : t + size, left : left + size] for t, left in ((0, 0), (0, far), (far, 0), (far, far), (c, c))]


def _as_input(crop: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(crop.copy()).permute(2, 0, 1).float().div(127.5).sub(1)  # (3, S, S) in [-1, 1]


def _encode_one(tokenizer: Tokenizer, crop: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return tokenizer.encode(_as_input(crop)[None])[0]  # (h, w)


def test_tencrop_views_and_labels_equal_crops_encoded_one_by_one(setup, tmp_path, capsys):
    store = tmp_path / "store"
    args = ["encode", str(setup["images"]), "--model", str(setup["model"]), "--store", str(store)]
    args += ["--image-size", "16", "--views", "tencrop+1.05", "--labels", "subfolders", "--shard-size", "4"]
    assert main([*args, "--batch-size", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 of 8 files" in captured.err and "n01_cat/broken.png" in captured.err
    assert "encoded 7 images (16x16, 20 view(s): tencrop+1.05) to 4x4 tokens each, 3 classes" in captured.out

    meta = json.loads((store / "meta.json").read_text())
    assert (meta["format"], meta["version"], meta["dtype"], meta["views"]) == (
        "fvq-tokens",
        2,
        "uint16",
        "tencrop+1.05",
    )
    assert meta["class_names"] == ["n01_cat", "n02_coffee", "n03_astronaut"]  # sorted subfolders -> 0, 1, 2
    assert meta["model_identity"] == model_identity(setup["model"]) and meta["num_images"] == 7
    assert meta["codebook_size"] == 32 and meta["grid"] == [4, 4] and len(meta["view_names"]) == 20
    assert [s["images"] for s in meta["shards"]] == [3, 4] and meta["num_skipped"] == 1
    assert meta["model_weights_sha256"] in meta["model_identity"]
    shard = np.load(store / "tokens-00000.npy", mmap_mode="r")
    assert shard.dtype == np.uint16 and shard.shape == (3, 20, 4, 4)

    data = TokenDataset(store, split="val")
    full = load_tokens(store)  # view 0 of every image, with the source names
    names = full.sources
    assert names[2:4] == ["n01_cat/img2.png", "n02_coffee/img0.png"] and len(names) == 7
    assert [int(data[i].label) for i in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert full.skipped == ["n01_cat/broken.png"]

    tokens = np.concatenate([np.load(store / f"tokens-0000{k}.npy") for k in range(2)])  # (7, 20, 4, 4)
    expected, flipped = [], []  # (image, view, crop) of every view, cut here from the ADM crop
    for i, name in enumerate(names):
        image = Image.open(setup["images"] / name).convert("RGB")
        for s, scale in enumerate((1.1, 1.05)):
            large = _adm_center_crop(image, int(SIZE * scale))
            crops = _five_crops(large, SIZE) + _five_crops(large[:, ::-1], SIZE)  # torchvision's TenCrop
            expected.extend((i, 10 * s + view, crops[STORE_ORDER[view]]) for view in range(10))
            # the flipped views are crops of the mirrored image: view 5 + k is the mirror of the original crop in the
            # mirrored box of view k (int(1.1 * 16) - 16 = 1 is odd: the mirrored centre lies one pixel over)
            c, far = int(round((large.shape[0] - SIZE) / 2.0)), large.shape[0] - SIZE
            for k, (top, left) in enumerate(((c, c), (0, 0), (0, far), (far, 0), (far, far))):
                crop = large[top : top + SIZE, far - left : far - left + SIZE][:, ::-1]
                flipped.append((i, 10 * s + 5 + k, crop))
    tokenizer = _tokenizer(0)
    for i, view, crop in expected + flipped:
        if i == 2 and view < 10:  # one by one: the 1.1 views of the cat that is halved first (BOX) ...
            stored = torch.from_numpy(tokens[i, view].astype(np.int64))
            assert torch.equal(stored, _encode_one(tokenizer, crop)), (names[i], view)
    # ... and all of them in one batch (for time): the ids of a crop do not depend on its batch
    batch = torch.stack([_as_input(crop) for _, _, crop in expected + flipped])  # (350, 3, S, S)
    with torch.no_grad():
        batch_ids = tokenizer.encode(batch)  # (350, h, w)
    stored = torch.stack([torch.from_numpy(tokens[i, view].astype(np.int64)) for i, view, _ in expected + flipped])
    assert torch.equal(stored, batch_ids)
    assert len({tuple(t.flatten().tolist()) for t in batch_ids}) > 20  # the views differ: a meaningful comparison


def test_decode_reads_view_0_and_refuses_another_models_tokens(setup, tmp_path, capsys):
    store, out = setup["reference"], tmp_path / "decoded"
    assert main(["decode", str(store), "--model", str(setup["model"]), "--out", str(out), "--no-progress"]) == 0
    tokens = load_tokens(store)
    tokenizer = _tokenizer(0)
    with torch.no_grad():
        expected = tokenizer.decode(tokens.indices).clamp(-1, 1)
    expected = ((expected + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, name in enumerate(tokens.sources):
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), expected[i])
    capsys.readouterr()

    refused = tmp_path / "refused"
    assert main(["decode", str(store), "--model", str(setup["other"]), "--out", str(refused)]) == 2
    err = capsys.readouterr().err
    assert model_identity(setup["model"]) in err and model_identity(setup["other"]) in err and "--force" in err
    assert not refused.exists()
    data = TokenDataset(store)
    with pytest.raises(ForeignTokensError):
        check_tokens(load_model(setup["other"]), data)
    check_tokens(load_model(setup["model"]), data)
    with pytest.raises(ForeignTokensError):
        data.check_model_identity(model_identity(setup["other"]))


def test_resume_after_an_interruption_gives_identical_shards(setup, tmp_path, monkeypatch, capsys):
    store = tmp_path / "store"
    model = load_model(setup["model"])
    kwargs = {"image_size": SIZE, "views": "flip", "labels": "subfolders", "shard_size": 3, "batch_size": 2}
    real_write = pipeline.write_shard
    calls = []

    def interrupted(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[1])
        return real_write(*args, **kw)

    monkeypatch.setattr(pipeline, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode_store(model, [setup["images"]], store, **kwargs)
    monkeypatch.setattr(pipeline, "write_shard", real_write)
    assert calls == [0, 1] and not (store / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="--resume"):
        TokenDataset(store)

    args = ["encode", str(setup["images"]), "--model", str(setup["model"]), "--out", str(store), "--image-size", "16"]
    args += ["--views", "flip", "--labels", "subfolders", "--shard-size", "3"]
    assert main([*args, "--no-progress"]) == 2
    assert "partly encoded token store; pass --resume to finish it" in capsys.readouterr().err
    assert main([*args[:-6], "--views", "tencrop", "--labels", "subfolders", "--shard-size", "3", "--resume"]) == 2
    assert "other settings (views: 'flip' there, 'tencrop' now)" in capsys.readouterr().err

    # shard 1 damaged in place (same size), and a temporary file left behind by the interruption
    tokens_1 = store / "tokens-00001.npy"
    damaged = bytearray(tokens_1.read_bytes())
    damaged[-1] ^= 1
    tokens_1.write_bytes(bytes(damaged))
    (store / ".tokens-00002.npy.abc.tmp").write_bytes(b"partial")
    report = encode_store(model, [setup["images"]], store, resume=True, **kwargs)
    assert report.reused == [0] and report.encoded == [1, 2]
    assert _files(store) == _files(setup["reference"])  # byte for byte, meta.json included

    assert main([*args, "--resume", "--no-progress"]) == 0  # a complete store: checked and kept
    assert "(0 encoded by this process, 3 kept)" in capsys.readouterr().out
    assert _files(store) == _files(setup["reference"])
    assert main([*args, "--overwrite", "--no-progress", "--shard-size", "2"]) == 0  # starts again
    assert len(json.loads((store / "meta.json").read_text())["shards"]) == 4
    assert len(TokenDataset(store, verify="sha256")) == 7


def test_two_gloo_processes_write_the_same_store(setup, tmp_path):
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "fvq"]
    cmd += ["encode", str(setup["images"]), "--model", str(setup["model"]), "--out", str(store), "--image-size", "16"]
    cmd += ["--views", "flip", "--labels", "subfolders", "--shard-size", "3", "--no-progress"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout and "1 encoded by this process" in done.stdout  # 3 shards: 1 + 2
    assert _files(store) == _files(setup["reference"])


def test_storage_dtype_and_token_file_options(setup, tmp_path, capsys):
    large = _tokenizer(0, codebook_size=70_000)
    report = encode_store(large, [setup["images"] / "n03_astronaut"], tmp_path / "large", image_size=SIZE)
    shard = np.load(tmp_path / "large" / "tokens-00000.npy")
    assert report.meta["dtype"] == "int32" and shard.dtype == np.int32 and shard.shape == (2, 1, 4, 4)
    assert report.meta["labels"] == "none" and report.meta["class_names"] == []
    assert int(TokenDataset(tmp_path / "large")[1].label) == -1
    crop = EvalCrop(SIZE, "llamagen")(Image.open(setup["images"] / "n03_astronaut" / "img1.png").convert("RGB"))
    assert np.array_equal(shard[1, 0], _encode_one(large, np.asarray(crop)).numpy())  # "center": the protocol's crop

    # the single-file format keeps working, and refuses what only a store holds
    base = ["encode", str(setup["images"]), "--model", str(setup["model"]), "--image-size", "16", "--no-progress"]
    file = tmp_path / "t.safetensors"
    assert main([*base, "--out", str(file), "--views", "tencrop"]) == 2
    assert "--views need a token store: give --out DIR" in capsys.readouterr().err
    assert main([*base, "--out", str(file), "--labels", "subfolders"]) == 2
    assert main([*base, "--out", str(file)]) == 0
    assert load_tokens(file).num_images == 8  # the loose file too: no class folders needed
    assert main([*base, "--store", str(tmp_path / "s"), "--protocol", "fvq", "--views", "tencrop"]) == 2
    assert "ten-crop views are cut from ADM's centre crop" in capsys.readouterr().err
