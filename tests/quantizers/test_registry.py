"""The quantizer / projector registries and the config builders."""

from __future__ import annotations

import pytest
import torch

from fvq.quantizers import (
    PROJECTORS,
    QUANTIZERS,
    FiniteScalarQuantizer,
    GroupedQuantizer,
    MultiScaleResidualQuantizer,
    ResidualQuantizer,
    VectorQuantizer,
    VQBridge,
    build_projector,
    build_quantizer,
)
from fvq.quantizers.projectors import MLPProjector

VQ = {"type": "vq", "codebook_size": 64, "codebook_dim": 8}


def test_registries_are_plain_dicts_with_the_documented_names():
    assert type(QUANTIZERS) is dict and type(PROJECTORS) is dict
    assert {"vq", "fsq", "lfq", "bsq", "residual", "grouped", "multiscale"} <= set(QUANTIZERS)
    assert set(PROJECTORS) >= {"identity", "linear", "mlp", "vq_bridge"}


def test_projector_gets_codebook_size_and_dim_filled_in():
    q = build_quantizer({**VQ, "projector": {"type": "vq_bridge", "group_size": 16, "hidden_dim": 32}})
    assert isinstance(q, VectorQuantizer) and isinstance(q.projector, VQBridge)
    assert (q.projector.codebook_size, q.projector.codebook_dim, q.projector.group_size) == (64, 8, 16)
    assert q.codebook_vectors().shape == (64, 8)
    by_name = build_quantizer({**VQ, "projector": "linear"})
    assert by_name.projector.linear.in_features == 8
    mlp = build_projector({"type": "mlp", "depth": 3, "activation": "relu"}, 64, 8)
    assert isinstance(mlp, MLPProjector) and isinstance(mlp.net[1], torch.nn.ReLU)


def test_containers_build_their_inner_quantizers():
    shared = build_quantizer({"type": "residual", "num_quantizers": 4, "shared_codebook": True, "quantizer": VQ})
    assert isinstance(shared, ResidualQuantizer) and shared.shared and len(shared.layers) == 1
    per_depth = build_quantizer({"type": "residual", "num_quantizers": 3, "shared_codebook": False, "quantizer": VQ})
    assert len(per_depth.layers) == 3
    assert not torch.equal(per_depth.layers[0].codebook, per_depth.layers[1].codebook)  # independent inits
    grouped = build_quantizer(
        {"type": "grouped", "num_groups": 4, "codebook_dim": 8, "quantizer": {**VQ} | {"codebook_dim": 2}}
    )
    assert isinstance(grouped, GroupedQuantizer) and grouped.codebook_dim == 8 and grouped.group_dim == 2
    filled = build_quantizer(
        {"type": "grouped", "num_groups": 2, "codebook_dim": 8, "quantizer": {"type": "fsq", "levels": [3, 3]}}
    )
    assert isinstance(filled.layers[0], FiniteScalarQuantizer) and filled.layers[0].codebook_dim == 4
    ms = build_quantizer({"type": "multiscale", "scales": [1, 2, 4], "quantizer": {**VQ, "projector": "vq_bridge"}})
    assert isinstance(ms, MultiScaleResidualQuantizer) and isinstance(ms.quantizer.projector, VQBridge)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"type": "nope"}, r"valid types: \['bsq'"),
        ({"codebook_size": 8}, "no 'type' key"),
        ({**VQ, "codebok_size": 3}, r"unknown keys \['codebok_size'\].*valid keys"),
        ({"type": "vq", "codebook_size": 8}, r"needs keys \['codebook_dim'\]"),
        ({**VQ, "projector": {"type": "bridge"}}, r"unknown projector type 'bridge'; valid types"),
        ({**VQ, "projector": {"type": "linear", "codebook_dim": 4}}, "codebook_dim=4 but its quantizer has"),
        ({"type": "fsq", "levels": [1, 4]}, "levels"),
        ({"type": "fsq", "levels": [4], "projector": "linear"}, "takes no projector"),
        ({"type": "grouped", "num_groups": 3, "codebook_dim": 8, "quantizer": VQ}, "must divide"),
        ({"type": "grouped", "num_groups": 2, "codebook_dim": 8, "quantizer": VQ}, "inner codebook_dim=8"),
        ({"type": "multiscale", "scales": [1, 3, 2], "quantizer": VQ}, "strictly increasing"),
        ({"type": "residual", "quantizer": VQ}, "num_quantizers"),
        ({"type": "residual", "num_quantizers": 2}, "'quantizer' key"),
        ({"type": "residual", "num_quantizers": 2, "depth": 3, "quantizer": VQ}, r"unknown keys \['depth'\]"),
    ],
)
def test_bad_configs_raise_clear_errors(config, match):
    with pytest.raises(ValueError, match=match):
        build_quantizer(config)


def test_non_dict_config_is_a_type_error():
    with pytest.raises(TypeError):
        build_quantizer(["vq"])
