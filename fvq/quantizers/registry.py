"""Quantizer and projector registries and the config -> module builders.

A config is plain data (a dict, e.g. from YAML), the source of truth for a quantizer::

    {"type": "vq", "codebook_size": 4096, "codebook_dim": 256,
     "projector": {"type": "vq_bridge", "group_size": 16}}
    {"type": "residual", "num_quantizers": 4, "shared_codebook": True, "codebook_loss": "cumulative",
     "quantizer": {"type": "vq", "codebook_size": 16384, "codebook_dim": 256, "projector": {"type": "vq_bridge"}}}
    {"type": "grouped", "num_groups": 4, "codebook_dim": 256, "quantizer": {"type": "vq", "codebook_size": 4096}}
    {"type": "multiscale", "scales": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
     "quantizer": {"type": "vq", "codebook_size": 16384, "codebook_dim": 256, "projector": "vq_bridge"}}

Every other key is a keyword argument of the registered class. A projector is given by name or by a dict with a
``type``; its ``codebook_size`` / ``codebook_dim`` are filled in from the quantizer. To register a new quantizer, add
its class to :data:`QUANTIZERS` (and a tiny config to the contract test, which fails for registered names without one).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from fvq.quantizers.base import Quantizer
from fvq.quantizers.bsq import BinarySphericalQuantizer
from fvq.quantizers.feature_init import check_kmeans_source, feature_dim
from fvq.quantizers.fsq import FiniteScalarQuantizer
from fvq.quantizers.grouped import GroupedQuantizer, group_dim
from fvq.quantizers.lfq import LookupFreeQuantizer
from fvq.quantizers.multiscale import MultiScaleResidualQuantizer
from fvq.quantizers.projectors import IdentityProjector, LinearProjector, MLPProjector
from fvq.quantizers.residual import ResidualQuantizer
from fvq.quantizers.vq import VectorQuantizer
from fvq.quantizers.vq_bridge import VQBridge

QUANTIZERS: dict[str, type] = {
    "vq": VectorQuantizer,
    "fsq": FiniteScalarQuantizer,
    "lfq": LookupFreeQuantizer,
    "bsq": BinarySphericalQuantizer,
    "residual": ResidualQuantizer,
    "grouped": GroupedQuantizer,
    "multiscale": MultiScaleResidualQuantizer,
}

PROJECTORS: dict[str, type] = {
    "identity": IdentityProjector,
    "linear": LinearProjector,
    "mlp": MLPProjector,
    "vq_bridge": VQBridge,
}

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


# ---------------------------------------------------------------------------------------------------------------------
def _split_type(config: Any, registry: Mapping[str, type], kind: str) -> tuple[str, dict[str, Any]]:
    """``config`` (a name or a dict with ``type``) -> ``(name, remaining keys)``; clear errors otherwise."""
    if isinstance(config, str):
        config = {"type": config}
    if not isinstance(config, Mapping):
        raise TypeError(f"a {kind} config must be a dict with a 'type' key (or a name), got {type(config).__name__}")
    rest = dict(config)
    if "type" not in rest:
        raise ValueError(f"{kind} config {dict(config)!r} has no 'type' key; valid types: {sorted(registry)}")
    name = rest.pop("type")
    if name not in registry:
        raise ValueError(f"unknown {kind} type {name!r}; valid types: {sorted(registry)}")
    return name, rest


def _construct(cls: type, name: str, kind: str, kwargs: dict[str, Any], reserved: tuple[str, ...] = ()) -> Any:
    """``cls(**kwargs)`` after checking the keys against its signature, with errors listing the valid keys."""
    params = inspect.signature(cls).parameters
    valid = [p for p in params if p not in ("self", *reserved) and params[p].kind not in (params[p].VAR_POSITIONAL,)]
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in kwargs if k not in params or k in reserved)
    if unknown and not accepts_any:
        raise ValueError(f"unknown keys {unknown} for {kind} {name!r}; valid keys: {sorted(valid)}")
    required = [
        p
        for p, spec in params.items()
        if spec.default is inspect.Parameter.empty
        and spec.kind not in (spec.VAR_POSITIONAL, spec.VAR_KEYWORD)
        and p not in reserved
    ]
    missing = [p for p in required if p not in kwargs]
    if missing:
        raise ValueError(f"{kind} {name!r} needs keys {missing}; valid keys: {sorted(valid)}")
    return cls(**kwargs)


def build_projector(
    config: str | Mapping[str, Any], codebook_size: int, codebook_dim: int, input_dim: int | None = None
) -> nn.Module:
    """Build a codebook projector from ``"name"`` or ``{"type": name, **kwargs}``.

    ``codebook_size`` and ``codebook_dim`` (and ``input_dim`` when the raw codebook is wider or narrower than D) are
    passed to the projector when its constructor takes them; giving them in the config is allowed only if they agree.

    Args:
        config: Projector name (``identity``, ``linear``, ``mlp``, ``vq_bridge``) or dict.
        codebook_size: K of the quantizer the projector serves.
        codebook_dim: D of the quantizer the projector serves.
        input_dim: Channels of the raw codebook when they differ from D (a codebook of encoder features); only
            projectors with an ``input_dim`` argument (``linear``) can map them.
    """
    name, kwargs = _split_type(config, PROJECTORS, "projector")
    cls = PROJECTORS[name]
    params = inspect.signature(cls).parameters
    if input_dim is not None and input_dim != codebook_dim:
        if "input_dim" not in params:
            raise ValueError(
                f"the raw codebook has {input_dim} channels (its k-means features) but codebook_dim is {codebook_dim}; "
                f"projector {name!r} maps D -> D only: use projector {{type: linear}} (VQGAN-LC)"
            )
        if kwargs.get("input_dim", input_dim) != input_dim:
            raise ValueError(
                f"projector {name!r} has input_dim={kwargs['input_dim']} but the features have {input_dim}"
            )
        kwargs["input_dim"] = input_dim
    for key, value in (("codebook_size", codebook_size), ("codebook_dim", codebook_dim)):
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"projector {name!r} has {key}={kwargs[key]} but its quantizer has {key}={value}")
        if key in params:
            kwargs[key] = value
    if isinstance(kwargs.get("activation"), str):
        act = kwargs["activation"]
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; valid: {sorted(ACTIVATIONS)}")
        kwargs["activation"] = ACTIVATIONS[act]
    return _construct(cls, name, "projector", kwargs)


# ---------------------------------------------------------------------------------------------------------------------
def _sub_config(kwargs: dict[str, Any], owner: str) -> dict[str, Any]:
    if "quantizer" not in kwargs:
        raise ValueError(f"{owner!r} config needs a 'quantizer' key holding the inner quantizer's config")
    sub = kwargs.pop("quantizer")
    if not isinstance(sub, Mapping):
        raise TypeError(f"{owner!r}: 'quantizer' must be a dict config, got {type(sub).__name__}")
    return dict(sub)


def _check_keys(kwargs: dict[str, Any], valid: tuple[str, ...], owner: str) -> None:
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        valid_keys = sorted((*valid, "quantizer"))
        raise ValueError(f"unknown keys {unknown} for quantizer {owner!r}; valid keys: {valid_keys}")


def _build_residual(kwargs: dict[str, Any]) -> Quantizer:
    sub = _sub_config(kwargs, "residual")
    _check_keys(
        kwargs, ("num_quantizers", "shared_codebook", "quantizer_dropout", "dropout_seed", "codebook_loss"), "residual"
    )
    if "num_quantizers" not in kwargs:
        raise ValueError("'residual' config needs 'num_quantizers' (number of depths)")
    n = int(kwargs["num_quantizers"])
    if n < 1:
        raise ValueError(f"num_quantizers must be >= 1, got {n}")
    shared = bool(kwargs.get("shared_codebook", True))
    inner: Quantizer | list[Quantizer] = build_quantizer(sub) if shared else [build_quantizer(sub) for _ in range(n)]
    return ResidualQuantizer(
        inner,
        num_quantizers=n,
        quantizer_dropout=float(kwargs.get("quantizer_dropout", 0.0)),
        dropout_seed=int(kwargs.get("dropout_seed", 0)),
        codebook_loss=str(kwargs.get("codebook_loss", "cumulative")),
    )


def _build_grouped(kwargs: dict[str, Any]) -> Quantizer:
    sub = _sub_config(kwargs, "grouped")
    _check_keys(kwargs, ("num_groups", "codebook_dim", "shared_codebook"), "grouped")
    if "num_groups" not in kwargs:
        raise ValueError("'grouped' config needs 'num_groups'")
    g = int(kwargs["num_groups"])
    if "codebook_dim" in kwargs:
        dim = group_dim(int(kwargs["codebook_dim"]), g)
        if sub.get("codebook_dim", dim) != dim:
            raise ValueError(
                f"'grouped': inner codebook_dim={sub['codebook_dim']} but codebook_dim={kwargs['codebook_dim']} / "
                f"num_groups={g} = {dim}"
            )
        sub["codebook_dim"] = dim
    shared = bool(kwargs.get("shared_codebook", False))
    inner: Quantizer | list[Quantizer] = build_quantizer(sub) if shared else [build_quantizer(sub) for _ in range(g)]
    return GroupedQuantizer(inner, num_groups=g)


def _build_multiscale(kwargs: dict[str, Any]) -> Quantizer:
    sub = _sub_config(kwargs, "multiscale")
    _check_keys(kwargs, ("scales", "quant_resi", "num_phi", "phi_kernel_size"), "multiscale")
    inner = build_quantizer(sub)
    if "scales" in kwargs:
        kwargs["scales"] = tuple(kwargs["scales"])
    return MultiScaleResidualQuantizer(inner, **kwargs)


# containers whose config nests another quantizer's config
_CONTAINER_BUILDERS: dict[str, Callable[[dict[str, Any]], Quantizer]] = {
    "residual": _build_residual,
    "grouped": _build_grouped,
    "multiscale": _build_multiscale,
}


def build_quantizer(config: Mapping[str, Any]) -> Quantizer:
    """Build a quantizer from a plain config dict (see the module docstring for examples).

    Args:
        config: ``{"type": name, **kwargs}``; ``name`` is a key of :data:`QUANTIZERS`. A ``projector`` entry (name or
            dict) is built with :func:`build_projector` and handed to the quantizer; containers (``residual``,
            ``grouped``, ``multiscale``) take the inner quantizer's config under ``quantizer``.

    Raises:
        ValueError: unknown type, unknown or missing keys, inconsistent sizes (messages list the valid choices).
        TypeError: a config that is not a dict.
    """
    name, kwargs = _split_type(config, QUANTIZERS, "quantizer")
    if name in _CONTAINER_BUILDERS:
        return _CONTAINER_BUILDERS[name](kwargs)
    cls = QUANTIZERS[name]
    if "levels" in kwargs and isinstance(kwargs["levels"], tuple):
        kwargs["levels"] = list(kwargs["levels"])
    if "projector" in kwargs and kwargs["projector"] is not None and not isinstance(kwargs["projector"], nn.Module):
        if "projector" not in inspect.signature(cls).parameters:
            raise ValueError(f"quantizer {name!r} takes no projector")
        missing = [k for k in ("codebook_size", "codebook_dim") if k not in kwargs]
        if missing:
            raise ValueError(f"quantizer {name!r} with a projector needs keys {missing}")
        input_dim = None
        if kwargs.get("kmeans_init") and kwargs.get("kmeans_source", "latents") != "latents":
            input_dim = feature_dim(check_kmeans_source(kwargs["kmeans_source"]))
        kwargs["projector"] = build_projector(
            kwargs["projector"], kwargs["codebook_size"], kwargs["codebook_dim"], input_dim=input_dim
        )
    return _construct(cls, name, "quantizer", kwargs)


def export_config(config: Any) -> Any:
    """The config of ``build_quantizer(config).export()``: what an exported model records.

    Walks the config (containers included); for a quantizer class with ``INFERENCE_KEYS`` only those keys (and
    ``type``) are kept, and every ``projector`` entry is dropped, since ``export()`` folds projectors into the codebook.
    """
    if isinstance(config, Mapping):
        cls = QUANTIZERS.get(config.get("type")) if isinstance(config.get("type"), str) else None
        keep = getattr(cls, "INFERENCE_KEYS", None)
        out = {}
        for key, value in config.items():
            if key == "projector" or (keep is not None and key != "type" and key not in keep):
                continue
            out[key] = export_config(value)
        return out
    if isinstance(config, (list, tuple)):
        return [export_config(v) for v in config]
    return copy.deepcopy(config)
