"""Optional fused GPU kernels. Everything here imports without Triton; callers check
``triton_available()`` (and each kernel's own support test) and otherwise use the reference path.
"""

from .hypermixing_triton import (
    FusedHyperMixing,
    fused_hyper_mixing,
    hyper_mixing_fused,
    interpreting,
    triton_available,
    unsupported_reason,
)

__all__ = [
    "FusedHyperMixing",
    "fused_hyper_mixing",
    "hyper_mixing_fused",
    "interpreting",
    "triton_available",
    "unsupported_reason",
]
