"""Quantizers on one contract (:class:`Quantizer` -> :class:`QuantizerOutput`)."""

from fvq.quantizers.base import Quantizer, QuantizerOutput
from fvq.quantizers.functional import nearest_codes, straight_through
from fvq.quantizers.projectors import IdentityProjector, LinearProjector, MLPProjector, ProjectorCost
from fvq.quantizers.usage import CodebookUsage, UsageReport
from fvq.quantizers.vq import VectorQuantizer
from fvq.quantizers.vq_bridge import VQBridge, bridge_cost, default_group_size

__all__ = [
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
