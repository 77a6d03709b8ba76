"""One contract test for every registered quantizer (and every projector inside a vector quantizer).

A quantizer registered in ``fvq.quantizers.registry.QUANTIZERS`` without a tiny config below makes
``test_every_registered_quantizer_has_a_tiny_config`` fail, so new entries are covered automatically once listed.
"""

from __future__ import annotations

import pytest
import torch

from fvq.quantizers.registry import PROJECTORS, QUANTIZERS, build_quantizer

D = 8
SIDE = 4  # spatial side of the test feature maps (the multi-scale quantizer's last scale)
BRIDGE = {"type": "vq_bridge", "group_size": 4, "hidden_dim": 16, "num_heads": 2, "expand_init": "xavier"}
VQ = {"type": "vq", "codebook_size": 32, "codebook_dim": D, "init": "normal", "init_scale": 1.0}


def vq(**extra):
    return {**VQ, **extra}


# name -> list of (case id, config, accepts (N, D) vectors)
TINY_CONFIGS: dict[str, list[tuple[str, dict, bool]]] = {
    "vq": [
        ("vq-plain", vq(), True),
        ("vq-cosine", vq(distance="cosine"), True),
        ("vq-identity", vq(projector="identity"), True),
        ("vq-linear", vq(projector={"type": "linear"}), True),
        ("vq-mlp", vq(projector={"type": "mlp", "depth": 2}), True),
        ("vq-vq_bridge", vq(projector=BRIDGE), True),
    ],
    "fsq": [
        ("fsq", {"type": "fsq", "levels": [5, 4, 3], "codebook_dim": D}, True),
        ("fsq-noproj", {"type": "fsq", "levels": [2, 3, 4, 5, 2, 3, 4, 8]}, True),
    ],
    "lfq": [
        ("lfq", {"type": "lfq", "codebook_dim": D, "num_bits": 6}, True),
        ("lfq-noproj-grouped", {"type": "lfq", "codebook_dim": D, "entropy_group_bits": 3}, True),
    ],
    "bsq": [("bsq", {"type": "bsq", "codebook_dim": D, "num_bits": 5}, True)],
    "residual": [
        (
            "residual-shared-bridge",
            {"type": "residual", "num_quantizers": 3, "shared_codebook": True, "quantizer": vq(projector=BRIDGE)},
            True,
        ),
        (
            "residual-per-depth",
            {"type": "residual", "num_quantizers": 2, "shared_codebook": False, "quantizer": vq()},
            True,
        ),
        (
            "residual-fsq",
            {"type": "residual", "num_quantizers": 2, "quantizer": {"type": "fsq", "levels": [3] * D}},
            True,
        ),
    ],
    "grouped": [
        (
            "grouped-bridge",
            {
                "type": "grouped",
                "num_groups": 2,
                "codebook_dim": D,
                "quantizer": {**vq(projector=BRIDGE), "codebook_dim": 4},
            },
            True,
        ),
        (
            "grouped-shared",
            {
                "type": "grouped",
                "num_groups": 4,
                "codebook_dim": D,
                "shared_codebook": True,
                "quantizer": {"type": "vq", "codebook_size": 16},
            },
            True,
        ),
    ],
    "multiscale": [
        ("multiscale-bridge", {"type": "multiscale", "scales": [1, 2, 4], "quantizer": vq(projector=BRIDGE)}, False),
        ("multiscale-nophi", {"type": "multiscale", "scales": [2, 3, 4], "quant_resi": 0.0, "quantizer": vq()}, False),
    ],
}

CASES = [
    pytest.param(name, config, vectors, id=case_id)
    for name in QUANTIZERS
    for case_id, config, vectors in TINY_CONFIGS.get(name, [(f"{name}-missing", None, False)])
]


def test_every_registered_quantizer_has_a_tiny_config():
    missing = sorted(set(QUANTIZERS) - set(TINY_CONFIGS))
    assert not missing, f"registered quantizers without a tiny config in test_contract.py: {missing}"


def test_every_projector_is_covered():
    used = {
        cfg["projector"] if isinstance(cfg["projector"], str) else cfg["projector"]["type"]
        for _, cfg, _ in TINY_CONFIGS["vq"]
        if "projector" in cfg
    }
    assert used == set(PROJECTORS), f"projectors without a vq contract case: {sorted(set(PROJECTORS) - used)}"


def _build(config):
    if config is None:
        pytest.fail("registered quantizer has no tiny config in TINY_CONFIGS")
    torch.manual_seed(0)
    return build_quantizer(config)


def _inputs(q, vectors: bool):
    torch.manual_seed(1)
    yield torch.randn(2, q.codebook_dim, SIDE, SIDE)
    if vectors:
        yield torch.randn(10, q.codebook_dim)


def _expected_index_shape(q, z) -> tuple[int, ...]:
    if hasattr(q, "num_tokens"):  # multi-scale: (B, sum_k s_k^2)
        return (z.shape[0], q.num_tokens)
    grid = (z.shape[0],) if z.ndim == 2 else (z.shape[0], z.shape[2], z.shape[3])
    return grid if q.codes_per_position == 1 else (*grid, q.codes_per_position)


@pytest.mark.parametrize("name, config, vectors", CASES)
def test_shapes_indices_and_exact_inverse(name, config, vectors):
    q = _build(config).eval()
    for z in _inputs(q, vectors):
        out = q(z)
        assert out.quantized.shape == z.shape
        assert out.quantized.dtype == z.dtype
        assert out.indices.dtype == torch.int64
        assert tuple(out.indices.shape) == _expected_index_shape(q, z)
        assert int(out.indices.min()) >= 0 and int(out.indices.max()) < q.codebook_size
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert all(torch.isfinite(v) for v in out.losses.values())
        assert all(torch.isfinite(v) for v in out.metrics.values())
        codes = q.encode(z)
        assert torch.equal(codes, out.indices)
        assert torch.equal(q.decode(codes), out.quantized), "decode(encode(z)) must equal forward(z).quantized"


@pytest.mark.parametrize("name, config, vectors", CASES)
def test_export_gives_identical_outputs(name, config, vectors):
    q = _build(config).eval()
    plain = q.export().eval()
    for z in _inputs(q, vectors):
        out, ref = plain(z), q(z)
        assert torch.equal(out.indices, ref.indices)
        assert torch.equal(out.quantized, ref.quantized)
        assert torch.equal(plain.decode(ref.indices), ref.quantized)


@pytest.mark.parametrize("name, config, vectors", CASES)
def test_gradients_reach_input_and_every_parameter(name, config, vectors):
    q = _build(config).train()
    z = torch.randn(2, q.codebook_dim, SIDE, SIDE, requires_grad=True)
    out = q(z)
    weight = torch.randn_like(out.quantized)
    ((out.quantized * weight).sum() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert z.grad.abs().sum() > 0, "straight-through gradient must reach the input"
    for pname, p in q.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"parameter {pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"parameter {pname} has a non-finite gradient"


@pytest.mark.parametrize("name, config, vectors", CASES)
def test_bad_inputs_raise(name, config, vectors):
    q = _build(config).eval()
    d = q.codebook_dim
    with pytest.raises(ValueError):
        q(torch.randn(2, d, SIDE))  # rank 3
    with pytest.raises(ValueError):
        q(torch.randn(2, d + 1, SIDE, SIDE))  # wrong channels
    z = torch.randn(2, d, SIDE, SIDE)
    z[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        q(z)
    z[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError):
        q.encode(z)
    if not vectors:
        with pytest.raises(ValueError):
            q(torch.randn(5, d))


@pytest.mark.parametrize("name, config, vectors", CASES)
def test_decode_rejects_out_of_range_indices(name, config, vectors):
    q = _build(config).eval()
    good = q.encode(torch.randn(2, q.codebook_dim, SIDE, SIDE))
    for bad_value in (q.codebook_size, -1):
        bad = good.clone()
        bad.view(-1)[0] = bad_value
        with pytest.raises(ValueError):
            q.decode(bad)
