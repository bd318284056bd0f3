"""Optional fused GPU kernels. Everything here imports without Triton; callers check
``triton_available()`` (and each kernel's own support test) and otherwise use the reference path.

A leaf package: it imports torch and triton only, nothing from scale_hyper (an import-linter
contract), so the reference implementations and the fallback decision live with the models.
"""

from .hypermixing_triton import (
    FusedHyperMixing,
    fused_hyper_mixing,
    interpreting,
    triton_available,
    unsupported_reason,
)

__all__ = [
    "FusedHyperMixing",
    "fused_hyper_mixing",
    "interpreting",
    "triton_available",
    "unsupported_reason",
]
