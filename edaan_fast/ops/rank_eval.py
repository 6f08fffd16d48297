"""``_rank_count_preceding``: the counting step of the sort-free ranking evaluation.

The op behind :func:`edaan_fast.ops.evaluate_rank`, :func:`edaan_fast.ops.rank_metrics` and
:func:`edaan_fast.ops.rank_metrics_from_features` (module ``edaan_fast.ops.evaluation``).

A positive's rank is the number of valid gallery items that precede it in the stable order on
(distance, gallery index). With the query's positives sorted by that key, positive ``k``
(0-based) is preceded by the ``k`` positives before it plus the negatives whose key is smaller;
the op counts those negatives over one block of gallery columns -- a tile of a distance matrix
computed on the fly, or one process's shard of the gallery -- so counts of several blocks add
up (tiles: a running sum; processes: an all-reduce). Items with the query's pid are never read:
they are junk (same camera) or positives, which are accounted for by ``k``. No autograd:
ranks are integers.
"""

from __future__ import annotations

import torch

from . import _library

__all__ = ["rank_count_preceding"]

NAN_FLAG = -(1 << 62)  # csrc/ops/rank_eval.h kRankNanFlag


def rank_count_preceding(
    dist: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    pos_offsets: torch.Tensor,
    pos_dist: torch.Tensor,
    pos_gidx: torch.Tensor,
    g_offset: int = 0,
) -> torch.Tensor:
    """Counts, per positive, the valid negatives of one gallery block that precede it.

    Args:
        dist: ``[Q, Gb]`` distances of the Q queries to a block of Gb gallery columns, any float
            dtype (compared exactly, in float for half types). Rows may be strided (a column
            slice of a larger matrix is read in place).
        q_pids: int64 ``[Q]``; g_pids: int64 ``[Gb]`` (the block's gallery pids).
        pos_offsets: int64 ``[Q + 1]``; query q's positives are ``pos_offsets[q]:pos_offsets[q+1]``.
        pos_dist: ``[P_total]`` the positives' distances, dtype of ``dist``, sorted per query by
            (distance, global gallery index).
        pos_gidx: int64 ``[P_total]`` the positives' global gallery indices.
        g_offset: global gallery index of ``dist``'s column 0 (ties break on global index).

    Returns:
        int64 ``[P_total]``: for each positive, the number of gallery items of this block with
        another pid (the same pid is junk or a positive) whose (distance, global index) is
        smaller. Every count of a query whose row holds a NaN at a position that could count is
        ``NAN_FLAG`` (a large negative number, still negative after adding other blocks).
    """
    _library.require_ops("rank_count_preceding")
    _library.require_cuda_kernels("rank_count_preceding", dist)
    return torch.ops.edaan_fast._rank_count_preceding.default(
        dist, q_pids, g_pids, pos_offsets, pos_dist, pos_gidx, int(g_offset)
    )


def _register() -> None:
    @torch.library.register_fake("edaan_fast::_rank_count_preceding")
    def _(dist, q_pids, g_pids, pos_offsets, pos_dist, pos_gidx, g_offset):
        op = "_rank_count_preceding"
        torch._check(
            dist.dim() == 2,
            lambda: f"{op}: dist must be a 2-D [num_query, num_gallery] tensor, got {dist.dim()}-D",
        )
        torch._check(
            pos_dist.dim() == 1 and pos_gidx.shape == pos_dist.shape,
            lambda: f"{op}: pos_gidx must be int64 {list(pos_dist.shape)} like pos_dist, "
            f"got {list(pos_gidx.shape)}",
        )
        return torch.empty(pos_gidx.shape, dtype=torch.int64, device=dist.device)


if _library.load_library():
    _register()
