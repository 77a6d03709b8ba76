"""The evaluation protocol: the held-out size check, the usage curve, restart counts, one real evaluation."""

from __future__ import annotations

import pytest
import torch

from fvq.data import build_dataset
from fvq.models import Tokenizer
from fvq.quantizers.registry import build_quantizer
from fvq.repro.protocol import (
    _NOT_SEEN,
    HeldOutTooSmallError,
    Protocol,
    check_heldout,
    evaluate_heldout,
    heldout_data,
    restarted_codes,
    usage_curve,
)


def test_a_held_out_set_too_small_for_k_is_refused_with_the_size_that_suffices():
    protocol = Protocol()
    check_heldout(4096, 64, 4096, protocol)  # exactly 64 tokens per code
    with pytest.raises(
        HeldOutTooSmallError, match=r"1024 images x 64 tokens = 65536 tokens, 16.0 per code.*val_samples >= 4096"
    ):
        check_heldout(1024, 64, 4096, protocol)


def test_usage_curve_counts_codes_first_seen_before_each_mark():
    # K = 4: code 2 first at position 0, code 0 at 3, code 1 at 9, code 3 never
    first_seen = torch.tensor([3, 9, 0, _NOT_SEEN])
    curve = usage_curve(first_seen, total_tokens=16, codebook_size=4, points=5)
    assert curve["tokens"] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert curve["usage"] == [0.25, 0.25, 0.5, 0.5, 0.75]
    assert curve["tokens_per_code"][-1] == 4.0


def test_restarted_codes_sum_every_restarter_and_none_without():
    plain = build_quantizer({"type": "vq", "codebook_size": 8, "codebook_dim": 4})
    assert restarted_codes(plain) is None
    restarting = build_quantizer(
        {"type": "vq", "codebook_size": 8, "codebook_dim": 4, "restart_strategy": "random", "restart_every": 1}
    )
    restarting.restarter.restarted_total.fill_(5)
    assert restarted_codes(restarting) == 5


def test_protocol_keys_are_checked():
    with pytest.raises(ValueError, match="unknown protocol keys \\['tokens'\\]"):
        Protocol.from_overrides({"tokens": 3})
    with pytest.raises(ValueError, match="needs validation data that takes val_samples"):
        heldout_data({"type": "folder", "path": "x"}, Protocol(heldout_samples=10))
    assert heldout_data({"type": "embedded", "val_samples": 3}, Protocol(heldout_samples=10))["val_samples"] == 10


def test_evaluation_of_a_real_model_on_held_out_crops():
    torch.manual_seed(0)
    model = Tokenizer.from_config(
        {"model": {"preset": "tiny_f4"}, "quantizer": {"type": "vq", "codebook_size": 32, "codebook_dim": 8}}
    ).eval()
    val_set = build_dataset({"type": "embedded", "image_size": 32, "val_samples": 6}, split="val")
    protocol = Protocol(min_tokens_per_code=8, image_metric_images=4, batch_size=4, curve_points=4)
    result = evaluate_heldout(model, val_set, protocol, restarted=None)
    assert result.images == 6 and result.tokens == 6 * 64 and result.tokens_per_code == 12.0
    assert 0 < result.usage <= 1 and result.dead_codes == round(32 * (1 - result.usage))
    assert result.image_metric_images == 4 and result.lpips_net == "alex" and 0 <= result.lpips
    assert result.usage_curve["usage"][-1] == result.usage and result.usage_curve["tokens"][-1] == 384
    assert result.restarted_codes is None and result.eval_seconds > 0
    with pytest.raises(HeldOutTooSmallError):
        evaluate_heldout(model, val_set, Protocol(), restarted=None)
