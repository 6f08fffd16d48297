"""Fused operators of edaan_fast, usable without any model code.

``import edaan_fast.ops`` loads the compiled library quietly; a missing or mismatched build
raises :class:`OpsNotAvailableError` at the first call of a fused op. The pure-PyTorch twins in
:mod:`edaan_fast.ops.reference` are used instead only when asked for
(``EDAAN_FAST_OPS=reference`` or :func:`set_reference_ops`).
"""

from ._library import (
    OpsNotAvailableError,
    build_info,
    has_ops,
    set_reference_ops,
    use_reference_ops,
)
from .mask_blend import mask_background, mask_blend

__all__ = [
    "OpsNotAvailableError",
    "build_info",
    "has_ops",
    "mask_background",
    "mask_blend",
    "set_reference_ops",
    "use_reference_ops",
]

from .evaluation import (  # noqa: E402
    RankMetrics,
    evaluate_rank,
    pairwise_distance,
    rank_metrics,
    rank_metrics_from_features,
)

__all__ += [
    "RankMetrics",
    "evaluate_rank",
    "pairwise_distance",
    "rank_metrics",
    "rank_metrics_from_features",
]
