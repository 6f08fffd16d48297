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
from .metric_losses import batch_hard_mining, quartet_loss, triplet_loss
from .reflect_pad_conv2d import reflect_pad_conv2d

__all__ = [
    "OpsNotAvailableError",
    "batch_hard_mining",
    "build_info",
    "has_ops",
    "mask_background",
    "mask_blend",
    "quartet_loss",
    "reflect_pad_conv2d",
    "set_reference_ops",
    "triplet_loss",
    "use_reference_ops",
]

from .evaluation import (  # noqa: E402
    RankMetrics,
    RowBlocks,
    evaluate_rank,
    pairwise_distance,
    rank_metrics,
    rank_metrics_from_features,
    rank_metrics_from_row_blocks,
)

__all__ += [
    "RankMetrics",
    "RowBlocks",
    "evaluate_rank",
    "pairwise_distance",
    "rank_metrics",
    "rank_metrics_from_features",
    "rank_metrics_from_row_blocks",
]
