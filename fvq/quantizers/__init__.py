"""Quantizers on one contract (:class:`Quantizer` -> :class:`QuantizerOutput`)."""

from fvq.quantizers.base import Quantizer, QuantizerOutput
from fvq.quantizers.bsq import BinarySphericalQuantizer
from fvq.quantizers.fsq import FiniteScalarQuantizer
from fvq.quantizers.functional import straight_through
from fvq.quantizers.grouped import GroupedQuantizer
from fvq.quantizers.lfq import LookupFreeQuantizer
from fvq.quantizers.multiscale import MultiScaleResidualQuantizer
from fvq.quantizers.projectors import IdentityProjector, LinearProjector, MLPProjector, ProjectorCost
from fvq.quantizers.registry import PROJECTORS, QUANTIZERS, build_projector, build_quantizer
from fvq.quantizers.residual import ResidualQuantizer
from fvq.quantizers.search import nearest_codes
from fvq.quantizers.usage import CodebookUsage, UsageReport
from fvq.quantizers.vq import VectorQuantizer
from fvq.quantizers.vq_bridge import VQBridge, bridge_cost, default_group_size

__all__ = [
    "PROJECTORS",
    "QUANTIZERS",
    "BinarySphericalQuantizer",
    "FiniteScalarQuantizer",
    "GroupedQuantizer",
    "LookupFreeQuantizer",
    "MultiScaleResidualQuantizer",
    "ResidualQuantizer",
    "build_projector",
    "build_quantizer",
    "CodebookUsage",
    "IdentityProjector",
    "LinearProjector",
    "MLPProjector",
    "ProjectorCost",
    "Quantizer",
    "QuantizerOutput",
    "UsageReport",
    "VQBridge",
    "VectorQuantizer",
    "bridge_cost",
    "default_group_size",
    "nearest_codes",
    "straight_through",
]
