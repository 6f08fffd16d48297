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

__all__ = ["distance_gemm", "rank_count_preceding", "rank_sort_positives"]

NAN_FLAG = -(1 << 62)  # csrc/ops/rank_eval.h kRankNanFlag


def rank_sort_positives(
    pos_offsets: torch.Tensor, pos_dist: torch.Tensor, pos_gidx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorts each query's positives by (distance, global gallery index).

    Args:
        pos_offsets: int64 ``[Q + 1]``; query q's positives are ``pos_offsets[q]:pos_offsets[q+1]``.
        pos_dist: ``[P_total]`` float distances; pos_gidx: int64 ``[P_total]`` global indices.

    Returns:
        ``(pos_dist, pos_gidx)`` sorted within each query's segment (new tensors). Insertion
        sort per query: meant for the few positives of a re-ID query.
    """
    _library.require_ops("rank_sort_positives")
    _library.require_cuda_kernels("rank_sort_positives", pos_dist)
    d, g = torch.ops.edaan_fast._rank_sort_positives.default(pos_offsets, pos_dist, pos_gidx)
    return d, g


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


def distance_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` (``[Q, D]``, ``[G, D]`` -> ``[Q, G]``) with float32 products in full float32,
    whatever TF32 / bfloat16 precision the process allows for float32 GEMMs (cuBLAS TF32 is
    switched off for the call, thread-locally; a CPU whose oneDNN may use bfloat16 or TF32 takes
    the product in float64). Without the compiled ops: the float64 product, rounded."""
    if not _library.has_ops() or _library.reference_enabled():
        return (a.double() @ b.double().t()).to(a.dtype)
    _library.require_cuda_kernels("distance_gemm", a)
    return torch.ops.edaan_fast._distance_gemm.default(a, b)


def _register() -> None:
    @torch.library.register_fake("edaan_fast::_distance_gemm")
    def _(a, b):
        torch._check(
            a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1],
            lambda: f"_distance_gemm: a and b must be 2-D [num, dim] with the same dim, got "
            f"{list(a.shape)} and {list(b.shape)}",
        )
        return a.new_empty((a.shape[0], b.shape[0]))

    @torch.library.register_fake("edaan_fast::_rank_sort_positives")
    def _(pos_offsets, pos_dist, pos_gidx):
        torch._check(
            pos_dist.dim() == 1 and pos_gidx.shape == pos_dist.shape,
            lambda: f"_rank_sort_positives: pos_gidx must be int64 {list(pos_dist.shape)} like "
            f"pos_dist, got {list(pos_gidx.shape)}",
        )
        return torch.empty_like(pos_dist), torch.empty_like(pos_gidx)

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
