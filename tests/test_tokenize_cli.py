"""``fvq encode`` / ``decode`` / ``reconstruct`` through the real CLI on real image files, and the token file format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from fvq.cli import main
from fvq.inference import (
    TokenFile,
    collect_images,
    decode_tokens,
    encode_images,
    load_model,
    load_tokens,
    model_identity,
    output_names,
    save_tokens,
)
from fvq.models import Tokenizer

CONFIG = {
    "model": {"preset": "tiny_f4"},
    "quantizer": {
        "type": "vq",
        "codebook_size": 64,
        "codebook_dim": 16,
        "projector": {"type": "vq_bridge", "group_size": 8, "hidden_dim": 32, "expand_init": "xavier"},
    },
}
SIZE = 16  # training image size recorded in the fake checkpoint; tiny_f4 gives 4 x 4 tokens


def _tokenizer(seed: int) -> Tokenizer:
    torch.manual_seed(seed)
    return Tokenizer.from_config(CONFIG).eval()


def _save_run(tokenizer: Tokenizer, run):
    """A training checkpoint with the layout of fvq.training (trainer.state_dict), reduced to what loading reads."""
    state = {
        "step": 7,
        "config": {**CONFIG, "data": {"type": "folder", "path": "/unused", "image_size": SIZE, "eval_crop": "fvq"}},
        "model": tokenizer.state_dict(),
    }
    (run / "checkpoints").mkdir(parents=True)
    torch.save(state, run / "checkpoints" / "step_00000007.pt")
    return run


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = _tokenizer(0)
    run = _save_run(tokenizer, root / "run")
    assert main(["export", str(run), "--out", str(root / "exported")]) == 0
    other = _tokenizer(1)
    other_run = _save_run(other, root / "other_run")
    return {"tokenizer": tokenizer, "run": run, "exported": root / "exported", "other": other_run}


def _as_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) in [-1, 1], written out independently of fvq's transforms."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@pytest.fixture()
def images(tmp_path):
    """Three real photos (PNG, JPEG, a larger PNG to be centre-cropped), a broken file and a non-image file."""
    from skimage import data

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(data.astronaut()[90:106, 190:206]).save(root / "a_astronaut.png")
    Image.fromarray(data.coffee()[150:166, 250:266]).save(root / "sub" / "b_coffee.jpg", quality=95)
    Image.fromarray(data.chelsea()[100:124, 150:190]).save(root / "sub" / "c_cat.png")  # 40 x 24: cropped
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image, not listed")
    expected = torch.stack(
        [
            _as_tensor(Image.open(root / "a_astronaut.png")),
            _as_tensor(Image.open(root / "sub" / "b_coffee.jpg")),
            _as_tensor(Image.open(root / "sub" / "c_cat.png"))[:, 4:20, 12:28],  # centre 16 x 16 of 24 x 40
        ]
    )
    return root, expected, ["a_astronaut.png", "sub/b_coffee.jpg", "sub/c_cat.png"]


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_encode_then_decode_through_cli(models, images, tmp_path, capsys):
    root, x, names = images
    tokens_path, out = tmp_path / "tokens.safetensors", tmp_path / "decoded"
    # the run is exported on the fly; the image size (16) and protocol (fvq) come from its training config
    assert main(["encode", str(root), "--model", str(models["run"]), "--out", str(tokens_path)]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 of 4 files" in captured.err and "broken.png" in captured.err
    assert str(tokens_path) in captured.out

    tokenizer = models["tokenizer"]  # the training model, projector and all
    with torch.no_grad():
        expected_ids = tokenizer.encode(x)  # (3, 4, 4)
        expected_images = tokenizer.decode(expected_ids)
    assert len(expected_ids.unique()) > 1  # a meaningful comparison

    tokens = load_tokens(tokens_path)
    assert torch.equal(tokens.indices, expected_ids)
    assert tokens.sources == names and tokens.skipped == ["broken.png"]
    assert (tokens.image_size, tokens.protocol, tokens.downsample_factor) == (SIZE, "fvq", 4)
    assert tokens.codebook_size == 64 and tokens.grid_shape == (4, 4) and tokens.codes_per_position == 1
    assert tokens.model_identity == model_identity(models["exported"]) == model_identity(tokenizer)
    with safe_open(str(tokens_path), framework="pt") as f:
        assert f.get_tensor("indices").dtype == torch.int32
        metadata = f.metadata()
    assert json.loads(metadata["sources"]) == names and metadata["format"] == "fvq-tokens"

    # decoding with the exported folder: same identity, so no --force needed
    assert main(["decode", str(tokens_path), "--model", str(models["exported"]), "--out", str(out)]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["a_astronaut.png", "sub/b_coffee.png", "sub/c_cat.png"]
    for i, name in enumerate(written):
        np.testing.assert_array_equal(_png(out / name), _uint8(expected_images)[i])
    # the library gives the same images
    decoded = decode_tokens(load_model(models["exported"]), tokens)
    assert np.array_equal(_uint8(decoded), _uint8(expected_images))
    # existing outputs are not replaced silently
    assert main(["decode", str(tokens_path), "--model", str(models["exported"]), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_decode_refuses_another_models_tokens_and_bad_ids(models, images, tmp_path, capsys):
    root, _, _ = images
    tokens_path = tmp_path / "tokens.safetensors"
    assert main(["encode", str(root), "--model", str(models["run"]), "--out", str(tokens_path)]) == 0
    mine, other = model_identity(models["run"]), model_identity(models["other"])
    assert mine != other
    capsys.readouterr()
    args = ["decode", str(tokens_path), "--model", str(models["other"])]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert mine in err and other in err and "--force" in err
    assert not (tmp_path / "refused").exists()
    assert main([*args, "--out", str(tmp_path / "forced"), "--force"]) == 0
    assert len(list((tmp_path / "forced").rglob("*.png"))) == 3

    tokens = load_tokens(tokens_path)
    for bad_value, shown in ((64, ", 64]: 1 out of range"), (-3, "ids in [-3, ")):
        ids = tokens.indices.clone()
        ids[1, 2, 3] = bad_value
        bad = TokenFile(indices=ids, codebook_size=64, model_identity=mine, sources=tokens.sources)
        save_tokens(tmp_path / "bad.safetensors", bad)
        out = tmp_path / f"bad_{bad_value}"
        assert (
            main(["decode", str(tmp_path / "bad.safetensors"), "--model", str(models["run"]), "--out", str(out)]) == 2
        )
        err = capsys.readouterr().err
        assert "[0, 63]" in err and "codebook_size 64" in err and shown in err and "sub/b_coffee.jpg" in err
        assert not out.exists()
        # --force skips the identity check, never the range check
        assert (
            main(
                [
                    "decode",
                    str(tmp_path / "bad.safetensors"),
                    "--model",
                    str(models["run"]),
                    "--out",
                    str(out),
                    "--force",
                ]
            )
            == 2
        )


def test_reconstruct_writes_pngs_grid_and_tokens(models, images, tmp_path, capsys):
    root, x, _ = images
    out, tokens_path = tmp_path / "recon", tmp_path / "tokens.safetensors"
    inputs = [str(root / "a_astronaut.png"), str(root / "sub"), str(root / "broken.png")]
    args = ["reconstruct", *inputs, "--model", str(models["exported"]), "--image-size", "16", "--protocol", "fvq"]
    assert main([*args, "--out", str(out), "--tokens", str(tokens_path), "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "mean PSNR" in captured.out and "skipped 1 of 4" in captured.err
    with torch.no_grad():
        ids = models["tokenizer"].encode(x)
        expected = _uint8(models["tokenizer"].decode(ids))
    for i, name in enumerate(["a_astronaut.png", "b_coffee.png", "c_cat.png"]):  # the folder's files relative to it
        np.testing.assert_array_equal(_png(out / name), expected[i])
    grid = Image.open(out / "reconstruction_grid.png")
    assert grid.size[0] > grid.size[1] > 0  # one row of originals over one row of reconstructions, 3 wide
    tokens = load_tokens(tokens_path)
    assert torch.equal(tokens.indices, ids) and tokens.sources == ["a_astronaut.png", "b_coffee.jpg", "c_cat.png"]
    assert tokens.model_identity == model_identity(models["exported"])


def test_encode_needs_an_image_size_when_the_model_records_none(images, tmp_path, capsys):
    root, _, _ = images
    torch.manual_seed(0)
    Tokenizer.from_config(
        {"model": {"preset": "tiny_f4"}, "quantizer": {"type": "fsq", "levels": [4, 4]}}
    ).save_pretrained(tmp_path / "plain")
    args = ["encode", str(root), "--model", str(tmp_path / "plain"), "--out", str(tmp_path / "t.safetensors")]
    assert main(args) == 2
    assert "--image-size" in capsys.readouterr().err
    assert main([*args, "--image-size", "10"]) == 2  # not a multiple of the downsampling factor 4
    assert "divisible" in capsys.readouterr().err
    assert main([*args, "--image-size", "8"]) == 0
    tokens = load_tokens(tmp_path / "t.safetensors")
    assert tokens.grid_shape == (2, 2) and tokens.protocol == "llamagen" and tokens.codebook_size == 16


def test_token_file_round_trip_multi_code_and_large_codebooks(tmp_path):
    ids = torch.randint(0, 256, (3, 2, 5, 4))  # 4 codes per position (residual / grouped quantizers)
    tokens = TokenFile(indices=ids, codebook_size=256, model_identity="abc+def", sources=["x.png", "y.png", "z.png"])
    loaded = load_tokens(save_tokens(tmp_path / "multi.safetensors", tokens))
    assert torch.equal(loaded.indices, ids) and loaded.indices.dtype == torch.int64
    assert loaded.codes_per_position == 4 and loaded.grid_shape == (2, 5) and loaded.sources == tokens.sources
    huge = TokenFile(indices=torch.tensor([[[2**31 + 5]]]), codebook_size=2**32, model_identity="abc+def")
    save_tokens(tmp_path / "huge.safetensors", huge)
    with safe_open(str(tmp_path / "huge.safetensors"), framework="pt") as f:
        assert f.get_tensor("indices").dtype == torch.int64
    assert int(load_tokens(tmp_path / "huge.safetensors").indices) == 2**31 + 5

    save_file({"indices": torch.zeros(1, 2, 2, dtype=torch.int32)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not an fvq token file"):
        load_tokens(tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="source names for 3 images"):
        TokenFile(indices=ids, codebook_size=256, model_identity="x", sources=["only-one.png"])
    with pytest.raises(TypeError, match="integer tensor"):
        TokenFile(indices=ids.float(), codebook_size=256, model_identity="x")


def test_output_names():
    assert output_names(["a/cat.jpg", "dog.png"], 2) == ["a/cat.png", "dog.png"]
    assert output_names(["cat.jpg", "cat.png", "dog.webp"], 3) == ["cat.jpg.png", "cat.png.png", "dog.png"]
    assert output_names(["../escape.png", "ok.png"], 2) == ["000000.png", "000001.png"]  # never outside --out
    assert output_names(["/etc/passwd", "ok.png"], 2) == ["000000.png", "000001.png"]
    assert output_names([], 2) == ["000000.png", "000001.png"]


def test_collect_images_and_identity(models, images, tmp_path):
    root, _, names = images
    found = collect_images([root, root / "sub" / "c_cat.png"])
    assert [s.name for s in found] == ["a_astronaut.png", "broken.png", *names[1:], "c_cat.png"]
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        collect_images([tmp_path / "missing"])
    # encode_images on a bare tokenizer (no recorded size) with explicit arguments
    tokens = encode_images(models["tokenizer"], [root], image_size=16, protocol="fvq")
    assert tokens.num_images == 3 and tokens.model_identity == model_identity(models["run"])
