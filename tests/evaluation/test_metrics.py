"""PSNR / SSIM: hand-computed cases, agreement with skimage and torchmetrics, the accumulator, ranks."""

from __future__ import annotations

import math
import multiprocessing
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fvq.evaluation.metrics import (
    ReconstructionMetrics,
    psnr,
    quantize_8bit,
    rgb_to_y,
    ssim,
    ssim_dr2,
    to_unit_range,
)

skm = pytest.importorskip("skimage.metrics")
skdata = pytest.importorskip("skimage.data")


def _const(value: float, size: int = 16) -> torch.Tensor:
    return torch.full((1, 3, size, size), value, dtype=torch.float64)


def _photo_pairs(n: int = 3, size: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 crops of a real photo and noisy, blurred reconstructions of them, (n, 3, size, size)."""
    rng = np.random.default_rng(seed)
    img = skdata.astronaut()
    crops, recs = [], []
    for _ in range(n):
        y, x = rng.integers(0, img.shape[0] - size, 2)
        c = img[y : y + size, x : x + size].astype(np.float64)
        blurred = (c + np.roll(c, 1, 0) + np.roll(c, 1, 1)) / 3
        r = np.clip(blurred + rng.normal(0, 6, c.shape), 0, 255).round()
        crops.append(c.astype(np.uint8))
        recs.append(r.astype(np.uint8))
    to_t = lambda a: torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).contiguous()
    return to_t(crops), to_t(recs)


# ----------------------------------------------------------------------------------------------------- PSNR


def test_psnr_constant_images_hand_computed():
    # 8-bit values 100 and 110 everywhere: MSE = (10/255)^2, PSNR = 20 log10(255 / 10)
    a, b = _const(100 / 255), _const(110 / 255)
    got = psnr(a, b, value_range=(0.0, 1.0))
    assert got.shape == (1,)
    assert got.item() == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)


def test_psnr_y_constant_shift_hand_computed():
    # +10 on every channel moves Y by (65.481 + 128.553 + 24.966) * 10 / 255 = 2190 / 255 on the 8-bit scale
    a, b = _const(100 / 255), _const(110 / 255)
    dy = 219.0 * 10 / 255
    got = psnr(a, b, value_range=(0.0, 1.0), channel="y")
    assert got.item() == pytest.approx(20 * math.log10(255 / dy), abs=1e-9)


def test_rgb_to_y_bt601_endpoints():
    black_white = torch.stack([torch.zeros(3, 1, 1), torch.ones(3, 1, 1)]).double()
    y = rgb_to_y(black_white)
    assert y.shape == (2, 1, 1, 1)
    assert y.flatten().tolist() == pytest.approx([16.0, 235.0])


def test_psnr_matches_skimage_and_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    a, b = _photo_pairs()
    got = psnr(a, b)
    ref = [skm.peak_signal_noise_ratio(x.permute(1, 2, 0).numpy(), y.permute(1, 2, 0).numpy()) for x, y in zip(a, b)]
    assert got.tolist() == pytest.approx(ref, abs=1e-6)
    ref_tm = [
        tm.peak_signal_noise_ratio(x[None].double() / 255, y[None].double() / 255, data_range=1.0) for x, y in zip(a, b)
    ]
    assert got.tolist() == pytest.approx([float(r) for r in ref_tm], abs=1e-4)  # torchmetrics sums in float32


def test_identical_images_infinite_psnr():
    a, _ = _photo_pairs(n=1)
    assert math.isinf(psnr(a, a).item())


def test_value_range_conventions_agree():
    a, b = _photo_pairs()
    as_m11 = lambda t: t.double() / 127.5 - 1.0
    as_01 = lambda t: t.double() / 255.0
    for fn in (psnr, ssim, ssim_dr2):
        ref = fn(a, b)
        assert torch.allclose(fn(as_m11(a), as_m11(b)), ref, atol=1e-10)
        assert torch.allclose(fn(as_01(a), as_01(b), value_range=(0.0, 1.0)), ref, atol=1e-10)
        # the wrong convention gives a different answer (the argument matters)
        assert not torch.allclose(fn(as_01(a), as_01(b)), ref, atol=1e-3)


def test_quantize_rounds_to_8_bit_levels():
    x = torch.tensor([0.0, 0.5 / 255 - 1e-6, 0.5 / 255, 1.0, 1.2, -0.1], dtype=torch.float64)
    assert (quantize_8bit(x) * 255).tolist() == [0.0, 0.0, 1.0, 255.0, 255.0, 0.0]
    a = _const(100 / 255)
    b = _const(110 / 255 + 0.3 / 255)  # off the 8-bit grid
    on = psnr(a, b, value_range=(0.0, 1.0))
    off = psnr(a, b, value_range=(0.0, 1.0), quantize=False)
    assert on.item() == pytest.approx(20 * math.log10(255 / 10))
    assert off.item() == pytest.approx(20 * math.log10(255 / 10.3))


def test_to_unit_range_clamps():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert to_unit_range(x).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_bad_inputs_rejected():
    a = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, torch.zeros(2, 3, 16, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        psnr(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="channel"):
        psnr(a, a, channel="lab")
    with pytest.raises(ValueError, match="value_range"):
        psnr(a, a, value_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(TypeError, match="uint8 or floating"):
        psnr(a.long(), a.long())


# ----------------------------------------------------------------------------------------------------- SSIM


def test_ssim_constant_images_hand_computed():
    # no variance: SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 L)^2
    a, b = _const(0.4, 24), _const(0.6, 24)
    kw = {"value_range": (0.0, 1.0), "quantize": False}
    c1 = 0.01**2
    assert ssim(a, b, **kw).item() == pytest.approx((2 * 0.24 + c1) / (0.16 + 0.36 + c1), abs=1e-12)
    c1_dr2 = (0.01 * 2.0) ** 2
    assert ssim_dr2(a, b, **kw).item() == pytest.approx((2 * 0.24 + c1_dr2) / (0.16 + 0.36 + c1_dr2), abs=1e-12)


def test_ssim_identical_is_one():
    a, _ = _photo_pairs()
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ssim_dr2(a, a), torch.ones(3, dtype=torch.float64), atol=1e-12)


def test_ssim_matches_skimage_gaussian():
    a, b = _photo_pairs()
    got = ssim(a, b)
    ref = [
        skm.structural_similarity(
            x.permute(1, 2, 0).numpy() / 255.0,
            y.permute(1, 2, 0).numpy() / 255.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        for x, y in zip(a, b)
    ]
    assert got.tolist() == pytest.approx(ref, abs=1e-4)
    # uint8 with the true data range (255) is the same number
    ref_u8 = skm.structural_similarity(
        a[0].permute(1, 2, 0).numpy(),
        b[0].permute(1, 2, 0).numpy(),
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )
    assert got[0].item() == pytest.approx(ref_u8, abs=1e-4)


def test_ssim_dr2_matches_the_published_skimage_call():
    a, b = _photo_pairs()
    got = ssim_dr2(a, b)
    # LlamaGen / FVQ: ssim_loss(rgb_restored, rgb_gt, multichannel=True, data_range=2.0, channel_axis=-1) on [0, 1]
    ref = [
        skm.structural_similarity(
            y.permute(1, 2, 0).numpy().astype(np.float32) / 255.0,
            x.permute(1, 2, 0).numpy().astype(np.float32) / 255.0,
            data_range=2.0,
            channel_axis=-1,
        )
        for x, y in zip(a, b)
    ]
    assert got.tolist() == pytest.approx(ref, abs=1e-4)


def test_ssim_matches_torchmetrics_on_valid_region():
    tm = pytest.importorskip("torchmetrics.functional.image")
    a, b = _photo_pairs()
    x, y = a.double() / 255, b.double() / 255
    # torchmetrics reflect-pads and averages the whole map; the reference definition (Wang et al., skimage)
    # averages the windows inside the image: compare on that region of torchmetrics' full SSIM map
    _, full = tm.structural_similarity_index_measure(x, y, data_range=1.0, return_full_image=True, reduction="none")
    ref = full[..., 5:-5, 5:-5].flatten(1).mean(dim=1)
    assert torch.allclose(ssim(a, b), ref, atol=1e-4)


def test_dr2_variant_is_inflated():
    a, b = _photo_pairs(n=4)
    correct, published = ssim(a, b), ssim_dr2(a, b)
    assert (published > correct).all()
    # data_range in the units of value_range: 2 on [0, 1] images is the same inflation for the Gaussian SSIM
    x, y = a.double() / 255, b.double() / 255
    assert (ssim(x, y, value_range=(0.0, 1.0), data_range=2.0) > ssim(x, y, value_range=(0.0, 1.0))).all()
    # while data_range=2 on [-1, 1] images is the correct one
    xm, ym = x * 2 - 1, y * 2 - 1
    assert torch.allclose(ssim(xm, ym, data_range=2.0), correct, atol=1e-12)


# ------------------------------------------------------------------------------------------ ReconstructionMetrics


def test_reconstruction_metrics_accumulates_per_image_means():
    a, b = _photo_pairs(n=5)
    lp = torch.rand(5)
    m = ReconstructionMetrics(value_range=(0.0, 1.0))
    x, y = a.float() / 255, b.float() / 255
    m.update(x[:2], y[:2], lpips=lp[:2])
    m.update(x[2:], y[2:], lpips=lp[2:])
    out = m.compute()
    assert out["num_images"] == 5
    assert out["psnr"] == pytest.approx(psnr(a, b).mean().item(), abs=1e-9)
    assert out["psnr_y"] == pytest.approx(psnr(a, b, channel="y").mean().item(), abs=1e-9)
    assert out["ssim"] == pytest.approx(ssim(a, b).mean().item(), abs=1e-9)
    assert out["ssim_dr2"] == pytest.approx(ssim_dr2(a, b).mean().item(), abs=1e-9)
    assert out["lpips"] == pytest.approx(lp.double().mean().item(), abs=1e-6)
    m.reset()
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    m.update(x, y)
    assert "lpips" not in m.compute()
    with pytest.raises(ValueError, match="one value per image"):
        m.update(x, y, lpips=torch.rand(3))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        a, b = _photo_pairs(n=4)
        m = ReconstructionMetrics()
        shard = slice(rank * 2, rank * 2 + 2)
        m.update(a[shard], b[shard], lpips=torch.full((2,), float(rank)))
        queue.put((rank, m.compute()))
    finally:
        dist.destroy_process_group()


def run_two_ranks(worker, *args) -> dict:
    """Run ``worker(rank, 2, port, queue, *args)`` in two forked gloo processes; the ranks' results by rank."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, queue, *args)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
    return results


def test_reconstruction_metrics_all_reduce_across_ranks():
    a, b = _photo_pairs(n=4)
    results = run_two_ranks(_rank_worker)
    assert results[0] == results[1]
    assert results[0]["num_images"] == 4
    assert results[0]["psnr"] == pytest.approx(psnr(a, b).mean().item(), abs=1e-9)
    assert results[0]["ssim"] == pytest.approx(ssim(a, b).mean().item(), abs=1e-9)
    assert results[0]["lpips"] == pytest.approx(0.5)
