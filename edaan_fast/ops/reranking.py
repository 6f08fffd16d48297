"""The fused steps of k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, CVPR 2017).

:func:`edaan_fast.metrics.reranking.re_ranking` and ``re_ranking_features`` are built from these
four ops (math: ``csrc/ops/reranking.h``; pure-PyTorch twins: :mod:`edaan_fast.ops.reference`).
With ``N = Q + G`` items and ``M[i, j] = d(i, j)^2 / max_j' d(i, j')^2`` the paper's
row-normalised original distance:

* :func:`knn_lists` -- one row tile of scores in, per row the ``k`` smallest ``M`` entries
  in the stable order on (value, index) (``N(i, k)``), never a sort of a row and never the
  ``N x N`` matrix: a caller streams tiles (a GEMM each, from features).
* :func:`knn_features` -- :func:`knn_lists` fused with the GEMM that makes the scores, from
  features (CPU): the scores are made and consumed one cache-sized block at a time, so neither
  the ``N x N`` matrix nor a row tile of it is ever written.
* :func:`k_reciprocal_sets` -- ``R*(i)`` of eq. 6 from the neighbour table.
* :func:`query_expansion` -- eq. 11, the mean of ``V`` (eq. 7, CSR) over ``N(i, k2)``.
* :func:`jaccard_rerank_` -- eq. 10 through the inverted index of the gallery rows of ``V``:
  one pass per query over its non-zeros and their columns' entries into a dense row, then
  eq. 12 written in place over the original distances.

The results are exact: ties break on the lower index everywhere, and sums add in the order of
the authors' code. float32 and float64; CPU and CUDA (``knn_features``: CPU). No autograd
(selection and sets).

The CUDA kernels validate their CSR and neighbour-table inputs on the device (one small kernel
and one flag read per input) before using them: a malformed input raises the same
``RuntimeError`` as on the CPU instead of an illegal memory access.
"""

from __future__ import annotations

import torch

from . import _library

__all__ = ["jaccard_rerank_", "k_reciprocal_sets", "knn_features", "knn_lists", "query_expansion"]

METRICS = ("distance", "euclidean", "cosine")


def knn_lists(
    scores: torch.Tensor,
    k: int,
    metric: str = "distance",
    row_sq: torch.Tensor | None = None,
    col_sq: torch.Tensor | None = None,
    kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` nearest neighbours of each row of one tile of the ``N``-column problem.

    Args:
        scores: ``[B, N]`` float32/float64 tile (row stride free, columns contiguous):
            ``metric="distance"``: distances ``d`` (squared inside); ``"euclidean"``: dot
            products ``f_i . f_j`` of features, with ``row_sq`` ``[B]`` and ``col_sq`` ``[N]``
            their squared norms (``d^2 = max(|f_i|^2 + |f_j|^2 - 2 f_i . f_j, 0)``);
            ``"cosine"``: dot products of unit features (``d = max(1 - s, 0)``).
        k: neighbours per row, ``1 <= k <= N``.
        kept: optional ``[B, K]`` output (rows contiguous, any row stride) that receives the
            last ``K`` columns of ``M`` (a query tile's gallery part, written into the result).

    Returns:
        ``(nn, nn_dist, scale)``: int64 ``[B, k]`` column indices ordered by (``M`` value,
        index), ``[B, k]`` their ``M`` values, ``[B]`` the row scale ``max_j d^2`` (1 for an
        all-zero row; NaN or inf when the row holds one, and then the row's lists are
        placeholders).
    """
    _library.require_ops("knn_lists")
    _library.require_cuda_kernels("knn_lists", scores)
    empty = scores.new_empty(0)
    if kept is None:
        kept = scores.new_empty(scores.shape[0], 0)
    return torch.ops.edaan_fast.knn_lists.default(
        scores,
        empty if row_sq is None else row_sq,
        empty if col_sq is None else col_sq,
        int(k),
        metric,
        kept,
    )


def knn_features(
    features: torch.Tensor,
    k: int,
    metric: str = "euclidean",
    sq: torch.Tensor | None = None,
    row_start: int = 0,
    row_end: int | None = None,
    kept: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`knn_lists` of rows ``[row_start, row_end)`` of the scores ``features @
    features.T``, fused with the GEMM (CPU).

    Args:
        features: ``[N, D]`` float32/float64; for ``metric="cosine"`` unit rows.
        k: neighbours per row, ``1 <= k <= N``.
        metric: ``"euclidean"`` (``sq`` ``[N]``: the squared norms of the rows) or ``"cosine"``.
        kept: optional ``[B, K]`` output receiving the last ``K`` columns of ``M``.

    Returns:
        ``(nn, nn_dist, scale)`` as :func:`knn_lists` returns for the same rows' scores.
        The products of float32 features are taken in full float32 whatever precision the
        process allows for float32 GEMMs (and outside any autocast). Ties and the row scale are
        exact: the selection runs on raw squared distances with a margin for the rounding of the
        division by the (not yet known) scale, and a row that the margin cannot decide (its
        ``k``-th value subnormal or zero, or a flood of near-ties) is redone exactly.
    """
    _library.require_ops("knn_features")
    end = features.shape[0] if row_end is None else int(row_end)
    if kept is None:
        kept = features.new_empty(end - int(row_start), 0)
    return torch.ops.edaan_fast.knn_features.default(
        features, features.new_empty(0) if sq is None else sq, int(row_start), end, int(k),
        metric, kept,
    )


def k_reciprocal_sets(
    nn: torch.Tensor, nn_dist: torch.Tensor, k1: int, row_start: int = 0, row_end: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``R*(i)`` (eq. 6) of rows ``[row_start, row_end)``, as CSR.

    Args:
        nn: int64 ``[N, kmax]`` neighbour table of all ``N`` items (:func:`knn_lists`),
            ``kmax >= min(k1 + 1, N)``; nn_dist: its ``M`` values.
        k1: the paper's ``k1``: ``R(i, k1 + 1)`` expanded by the ``R(q, round(k1 / 2) + 1)``.

    Returns:
        ``(ptr, col, dist)``: int64 ``[B + 1]`` row offsets; int64 column indices, ascending
        within a row; ``M[i, col]`` where ``col`` is in row ``i`` of the table, NaN where it is
        not (the caller computes those: they are the few members that came in by expansion).
    """
    _library.require_ops("k_reciprocal_sets")
    _library.require_cuda_kernels("k_reciprocal_sets", nn)
    end = nn.shape[0] if row_end is None else int(row_end)
    return torch.ops.edaan_fast.k_reciprocal_sets.default(nn, nn_dist, int(k1), int(row_start), end)


def query_expansion(
    v_ptr: torch.Tensor,
    v_col: torch.Tensor,
    v_val: torch.Tensor,
    nn: torch.Tensor,
    k2: int,
    row_start: int = 0,
    row_end: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local query expansion (eq. 11): rows ``[row_start, row_end)`` of the mean of ``V`` over
    each row's first ``k2`` neighbours.

    ``V`` is CSR over all ``N`` rows (``v_ptr`` int64 ``[N + 1]``, columns ascending within a
    row); returns the CSR ``(ptr [B + 1], col, val)`` of the expanded rows, columns ascending.
    """
    _library.require_ops("query_expansion")
    _library.require_cuda_kernels("query_expansion", v_val)
    end = nn.shape[0] if row_end is None else int(row_end)
    return torch.ops.edaan_fast.query_expansion.default(
        v_ptr, v_col, v_val, nn, int(k2), int(row_start), end
    )


def jaccard_rerank_(
    dist: torch.Tensor,
    q_ptr: torch.Tensor,
    q_col: torch.Tensor,
    q_val: torch.Tensor,
    g_ptr: torch.Tensor,
    g_col: torch.Tensor,
    g_val: torch.Tensor,
    num_columns: int,
    lambda_value: float,
) -> torch.Tensor:
    """Eq. 10 and 12 in place: ``dist`` ``[B, G]`` holds ``M[q, Q + g]`` and becomes
    ``d_J(q, g) (1 - lambda) + M[q, Q + g] lambda``.

    Args:
        q_ptr, q_col, q_val: the ``B`` query rows of ``V`` in CSR (columns ascending).
        g_ptr, g_col, g_val: the ``G`` gallery rows of ``V`` in CSR (columns ascending).
        num_columns: ``N``, the columns of ``V``.

    ``d_J = 1 - s / (2 - s)`` with ``s = sum_c min(V[q, c], V[g, c])``, accumulated through the
    inverted index of the gallery rows (built inside, ``O(nnz)``), per query into a dense row,
    adding the columns in ascending order as the authors' loop does. Returns ``dist``.
    """
    _library.require_ops("jaccard_rerank_")
    _library.require_cuda_kernels("jaccard_rerank_", dist)
    torch.ops.edaan_fast.jaccard_rerank_.default(
        dist, q_ptr, q_col, q_val, g_ptr, g_col, g_val, int(num_columns), float(lambda_value)
    )
    return dist


def _register() -> None:
    @torch.library.register_fake("edaan_fast::knn_lists")
    def _(scores, row_sq, col_sq, k, metric, kept):
        torch._check(
            scores.dim() == 2,
            lambda: f"knn_lists: scores must be a 2-D [rows, N] tile, got {scores.dim()}-D",
        )
        B = scores.shape[0]
        return (
            scores.new_empty((B, k), dtype=torch.int64),
            scores.new_empty((B, k)),
            scores.new_empty((B,)),
        )

    @torch.library.register_fake("edaan_fast::knn_features")
    def _(features, sq, row_start, row_end, k, metric, kept):
        torch._check(
            features.dim() == 2,
            lambda: f"knn_features: features must be a 2-D [N, D] matrix, got {features.dim()}-D",
        )
        B = row_end - row_start
        return (
            features.new_empty((B, k), dtype=torch.int64),
            features.new_empty((B, k)),
            features.new_empty((B,)),
        )

    @torch.library.register_fake("edaan_fast::k_reciprocal_sets")
    def _(nn, nn_dist, k1, row_start, row_end):
        nnz = torch.library.get_ctx().new_dynamic_size()
        return (
            nn.new_empty((row_end - row_start + 1,)),
            nn.new_empty((nnz,)),
            nn_dist.new_empty((nnz,)),
        )

    @torch.library.register_fake("edaan_fast::query_expansion")
    def _(v_ptr, v_col, v_val, nn, k2, row_start, row_end):
        nnz = torch.library.get_ctx().new_dynamic_size()
        return (
            v_ptr.new_empty((row_end - row_start + 1,)),
            v_col.new_empty((nnz,)),
            v_val.new_empty((nnz,)),
        )

    @torch.library.register_fake("edaan_fast::jaccard_rerank_")
    def _(dist, q_ptr, q_col, q_val, g_ptr, g_col, g_val, num_columns, lambda_value):
        return None


if _library.load_library():
    _register()
