"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li: "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), exact, from fused ops on the input's device.

Symbols of the paper and where they live here (``N = Q + G`` probes and gallery items together):

* ``d(p, g_i)``: the original distance, squared and normalised by the row maximum
  (``M[i, j] = d(i, j)^2 / max_j' d(i, j')^2``), as the authors' code does. Row ``i`` of ``M`` is
  *column* ``i`` of the stacked matrix ``[[q_q, q_g], [q_g^T, g_g]]`` (the authors normalise
  columns, then transpose): the same as the row for symmetric ``q_q``/``g_g``, exact for any.
* ``N(p, k)``: the k nearest neighbours, in the stable order on (distance, index) (ties: the
  lower index first; the authors' ``argsort`` is not stable).
* ``R(p, k) = {g in N(p, k) : p in N(g, k)}`` (eq. 4) with ``k = k1 + 1``, and ``R*(p, k)``
  (eq. 6): plus every ``R(q, round(k1/2) + 1)`` of a ``q in R(p, k)`` sharing more than 2/3 of
  its members with ``R(p, k)`` (compared exactly, ``3 |∩| > 2 |R(q, k/2)|``).
* ``V_p`` (eq. 7): weights ``exp(-d(p, g))`` on ``R*(p, k)``, normalised to sum 1; local query
  expansion (eq. 11) averages ``V`` over ``N(p, k2)``.
* ``d_J`` (eq. 10): ``1 - sum min(V_p, V_g) / sum max(V_p, V_g)`` where ``sum max = 2 - sum min``
  (rows sum to 1); ``d* = (1 - lambda) d_J + lambda d`` (eq. 12).

Algorithm (the ops are in :mod:`edaan_fast.ops.reranking`, math in ``csrc/ops/reranking.h``):

1. each row's ``max(k1 + 1, k2)`` nearest neighbours, the row scale and, for query rows,
   ``M[q, Q:]`` (kept in the output, which eq. 12 mixes back in): from features on the CPU one
   fused op, :func:`~edaan_fast.ops.reranking.knn_features` (GEMM blocks that stay in cache,
   selected as they are made); otherwise per tile of ``row_chunk`` rows the tile's scores (a
   full-float32 GEMM from features, or the tile of the stacked distance blocks), then
   :func:`~edaan_fast.ops.reranking.knn_lists`;
2. :func:`~edaan_fast.ops.reranking.k_reciprocal_sets`: ``R*`` of every row, with the ``M``
   values the neighbour table knows; the few others are computed directly (a dot product per
   pair from features, a read from the blocks); the weights of eq. 7 in torch; ``V`` as CSR;
3. :func:`~edaan_fast.ops.reranking.query_expansion` (eq. 11, skipped for ``k2 = 1``);
4. the inverted index of the gallery rows of ``V`` (a stable sort by column), and per tile of
   queries :func:`~edaan_fast.ops.reranking.jaccard_distance`, mixed with ``M`` (eq. 12) in place.

Memory beyond the inputs and the ``Q x G`` output: one score tile (``row_chunk x N``, default
``2**22`` values on the CPU, four waves of the k-NN kernel's resident blocks on CUDA; none from
features on the CPU, whose fused op holds a 128 x 512 block per thread), the neighbour table (``N * max(k1+1, k2)`` indices and values), ``V`` and its
expansion as CSR (``(8 + itemsize)`` bytes per non-zero; ``R*`` has a few dozen members per row
and ``V`` after expansion a few hundred), the inverted index of its gallery rows, and one
``jaccard`` tile. Nothing ``N x N`` is ever allocated, from features or from blocks.

Streamed (:func:`re_ranking_features_rows`): step 4 runs one block of queries at a time in
place over the kept ``M[q, Q:]`` rows, and the ranking consumes each block before the next is
made: the evaluation holds the one ``Q x G`` buffer and never a second.

Distributed (``group=``): each process computes the neighbour lists, ``V`` rows, expansions and
Jaccard rows of its share of the queries and of the gallery; the tables are all-gathered
(``O(N k)``), and so is the output: every process returns the whole ``[Q, G]`` matrix, equal to
the single-process result.

Ties are broken by the lower index everywhere and sums add in the order of the authors' loops,
so in float64 the result equals :func:`_reference_re_ranking`, the classic per-probe loop, to
float rounding (``tests/test_reranking.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edaan_fast.ops.evaluation import as_tensor

__all__ = ["re_ranking", "re_ranking_features", "re_ranking_features_rows"]

_METRICS = ("euclidean", "cosine")


def _as_tensor(x: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    """A 2-D floating matrix from ``x``, through the evaluation inputs' one converter."""
    t = as_tensor(x, name)
    if device is not None:
        t = t.to(device)
    if not t.dtype.is_floating_point:
        t = t.to(torch.float64)
    if t.dim() != 2:
        raise ValueError(f"re_ranking: {name} must be 2-D, got shape {tuple(t.shape)}")
    return t


class _Source:
    """Where the scores of the ``N = Q + G`` rows come from (distance blocks or features)."""

    metric = "distance"
    tile_elements = 1 << 22  # CPU score tile: row_chunk = tile_elements // N
    tile_buffer = True  # tile() writes into a caller's [row_chunk, N] buffer

    def __init__(self, num_q: int, num_g: int, dtype: torch.dtype, device: torch.device):
        self.num_q, self.num_g = num_q, num_g
        self.n = num_q + num_g
        self.dtype, self.device = dtype, device
        self.col_sq: torch.Tensor | None = None

    def default_chunk(self) -> int:
        """Rows per score tile: ``tile_elements // N`` on the CPU; on CUDA sized from the device,
        not from N: four waves of the blocks the k-NN kernel keeps resident (a row per block of
        up to 8 warps; ``SMs x max threads per SM / 256`` blocks: 4,224 rows on an H100),
        within an eighth of the free memory."""
        if self.device.type != "cuda":
            return max(1, self.tile_elements // self.n)
        props = torch.cuda.get_device_properties(self.device)
        free, _ = torch.cuda.mem_get_info(self.device)
        itemsize = torch.finfo(self.dtype).bits // 8
        resident = props.multi_processor_count * max(1, props.max_threads_per_multi_processor // 256)
        return max(1, min(4 * resident, free // 8 // (self.n * itemsize)))

    def tile(self, r0: int, r1: int, buf: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """The ``[r1 - r0, N]`` scores of rows ``r0:r1`` (never straddling the query block)."""
        raise NotImplementedError

    def row_sq(self, r0: int, r1: int) -> torch.Tensor | None:
        return None

    def squared(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """``d(i, j)^2`` (row ``i`` of ``M`` before normalisation) for index pairs."""
        raise NotImplementedError

    def non_finite_error(self, row: int) -> ValueError:  # pragma: no cover
        raise NotImplementedError

    def knn_rows(self, lo: int, hi: int, k: int, chunk: int, kept: torch.Tensor | None):
        """``N(i, k)``, their ``M`` values and the row scales of rows ``lo:hi`` (within one
        block: queries or gallery), tile by tile; ``kept`` ``[hi - lo, G]`` receives the query
        rows' ``M[q, Q:]``. Raises on a row whose distances are not finite."""
        from edaan_fast.ops import reranking as ops

        parts = []
        buf = (torch.empty(min(chunk, max(hi - lo, 1)), self.n, dtype=self.dtype, device=self.device)
               if self.tile_buffer else None)
        for r0 in range(lo, hi, chunk):
            r1 = min(r0 + chunk, hi)
            part = None if kept is None else kept[r0 - lo : r1 - lo]
            parts.append(ops.knn_lists(
                self.tile(r0, r1, buf), k, self.metric, self.row_sq(r0, r1), self.col_sq, part
            ))
            self._check_finite(r0, parts[-1][2])
        if not parts:
            empty = torch.empty(0, k, dtype=self.dtype, device=self.device)
            return empty.long(), empty, empty[:, 0]
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))

    def _check_finite(self, r0: int, scale: torch.Tensor) -> None:
        bad = ~torch.isfinite(scale)
        if bool(bad.any()):
            raise self.non_finite_error(r0 + int(bad.nonzero()[0, 0]))


class _BlockSource(_Source):
    def __init__(self, q_g, q_q, g_g, dtype):
        super().__init__(q_g.shape[0], q_g.shape[1], dtype, q_g.device)
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g

    def tile(self, r0, r1, buf):
        nq = self.num_q
        if r1 <= nq:  # query rows: [q_q[:, i], q_g[i, :]]
            parts = (self.q_q[:, r0:r1].t(), self.q_g[r0:r1])
        else:  # gallery rows: [q_g[:, j], g_g[:, j]]
            g0, g1 = r0 - nq, r1 - nq
            parts = (self.q_g[:, g0:g1].t(), self.g_g[:, g0:g1].t())
        out = buf[: r1 - r0]
        torch.cat(parts, 1, out=out) if parts[0].dtype == self.dtype else out.copy_(
            torch.cat(parts, 1)
        )
        return out

    def squared(self, i, j):
        # M[i, j] = stacked[j, i]^2: read from the block that holds stacked[j, i]
        nq, ng = self.num_q, self.num_g
        v = torch.empty(i.shape, dtype=self.dtype, device=i.device)
        for iq in (True, False):
            for jq in (True, False):
                sel = ((i < nq) == iq) & ((j < nq) == jq)
                if not bool(sel.any()):
                    continue
                a, b = j[sel], i[sel]  # stacked[a, b]
                if jq and iq:
                    x = self.q_q[a, b]
                elif jq:
                    x = self.q_g[a, b - nq]
                elif iq:
                    x = self.q_g[b, a - nq]
                else:
                    x = self.g_g[a - nq, b - nq]
                v[sel] = x.to(self.dtype)
        return v * v

    def non_finite_error(self, row):
        nq = self.num_q
        if row < nq:
            where = [("q_q_dist", self.q_q[:, row]), ("q_g_dist", self.q_g[row])]
            item = f"query {row}"
        else:
            g = row - nq
            where = [("q_g_dist", self.q_g[:, g]), ("g_g_dist", self.g_g[:, g])]
            item = f"gallery item {g}"
        name = next((n for n, x in where if not bool(torch.isfinite(x).all())), where[-1][0])
        return ValueError(
            f"re_ranking: {name} must be finite, got NaN or inf among the distances of {item}"
        )


class _FeatureSource(_Source):
    tile_elements = 1 << 24  # the GEMM pays a per-call cost: taller tiles are faster
    tile_buffer = False  # each tile is a fresh full-float32 product

    def __init__(self, qf, gf, metric, dtype):
        super().__init__(qf.shape[0], gf.shape[0], dtype, qf.device)
        f = torch.cat([qf, gf], 0).to(dtype)
        if metric == "cosine":
            f = F.normalize(f, dim=1)
        self.f, self.metric = f.contiguous(), metric
        self.sq = (self.f * self.f).sum(1) if metric == "euclidean" else None
        self.col_sq = self.sq

    def tile(self, r0, r1, buf):
        # float32 products in full float32, whatever TF32 / bfloat16 setting or autocast the
        # caller has (a plain torch.mm would take TF32 on an A100/H100 under
        # allow_tf32 / set_float32_matmul_precision("high"), and the neighbour lists would
        # differ from the CPU's while the expansion-only members' d^2 stay in float32)
        from edaan_fast.ops.rank_eval import distance_gemm

        return distance_gemm(self.f[r0:r1], self.f)

    def knn_rows(self, lo, hi, k, chunk, kept):
        if self.device.type != "cpu":
            return super().knn_rows(lo, hi, k, chunk, kept)
        from edaan_fast.ops import reranking as ops

        # the fused k-NN: GEMM blocks that stay in cache, selected as they are made
        out = ops.knn_features(self.f, k, self.metric, self.sq, lo, hi, kept)
        self._check_finite(lo, out[2])
        return out

    def row_sq(self, r0, r1):
        return None if self.sq is None else self.sq[r0:r1]

    def squared(self, i, j):
        dot = (self.f[i] * self.f[j]).sum(1)
        if self.metric == "cosine":
            return (1.0 - dot).clamp_min(0) ** 2
        return (self.sq[i] + self.sq[j] - 2.0 * dot).clamp_min(0)

    def non_finite_error(self, row):
        return ValueError(
            f"re_ranking_features: the squared distances of item {row} overflow or are not finite"
        )


def re_ranking(
    q_g_dist: Any,
    q_q_dist: Any,
    g_g_dist: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    row_chunk: int | None = None,
    pair_budget: int = 1 << 21,
    *,
    group: Any = None,
) -> torch.Tensor:
    """k-reciprocal re-ranking of a query/gallery distance matrix.

    Args:
        q_g_dist: ``[Q, G]`` query-gallery distances; q_q_dist ``[Q, Q]``; g_g_dist ``[G, G]``
            (numpy arrays or tensors; computed on ``q_g_dist``'s device, in float64 for float64
            input and float32 otherwise). Distances, not squared: they are squared here, as in
            the authors' code. Every entry must be finite.
        k1, k2, lambda_value: the paper's ``k1 >= 1`` (reciprocal neighbourhood),
            ``1 <= k2 <= Q + G`` (local query expansion; 1 turns it off) and
            ``lambda in [0, 1]`` (weight of the original distance).
        row_chunk: rows of the ``N x N`` problem handled at once (default ``2**22 // N``; from
            features ``2**24 // N``: each tile is one GEMM, and taller tiles run faster; on
            CUDA four waves of the k-NN kernel's resident blocks, one row each, whatever N;
            from features on the CPU the fused k-NN works in cache-sized blocks and ignores
            it).
        pair_budget: most (item, neighbour) pairs whose distance is looked up at once.
        group: a ``torch.distributed`` process group (or ``torch.distributed.group.WORLD``):
            every process passes the same inputs, computes its share, and gets the whole result.

    Returns:
        ``[Q, G]`` re-ranked distances (tensor on the input's device).
    """
    qg = _as_tensor(q_g_dist, "q_g_dist")
    dev = qg.device
    qq = _as_tensor(q_q_dist, "q_q_dist", dev)
    gg = _as_tensor(g_g_dist, "g_g_dist", dev)
    num_q, num_g = qg.shape
    if qq.shape != (num_q, num_q) or gg.shape != (num_g, num_g):
        raise ValueError(
            f"re_ranking: expected q_q_dist [{num_q}, {num_q}] and g_g_dist [{num_g}, {num_g}] for "
            f"q_g_dist {tuple(qg.shape)}, got {tuple(qq.shape)} and {tuple(gg.shape)}"
        )
    dtype = torch.float64 if qg.dtype == torch.float64 else torch.float32
    src = _BlockSource(qg, qq, gg, dtype)
    return _re_rank(src, k1, k2, lambda_value, row_chunk, pair_budget, group)


def re_ranking_features(
    qf: Any,
    gf: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "euclidean",
    row_chunk: int | None = None,
    pair_budget: int = 1 << 21,
    *,
    group: Any = None,
) -> torch.Tensor:
    """:func:`re_ranking` from ``[Q, D]`` query and ``[G, D]`` gallery features.

    The distance is the euclidean distance (``"euclidean"``, squared inside as in the paper's
    code: ``max(|q|^2 + |g|^2 - 2 q.g, 0)``) or ``1 - cos`` (``"cosine"``). No ``N x N`` matrix
    is ever held, only the ``[Q, G]`` result: on the CPU the products are made and consumed one
    cache-sized block at a time (:func:`~edaan_fast.ops.reranking.knn_features`), on CUDA one
    tile of rows at a time. The products of float32 features are full float32 whatever
    reduced-precision GEMM setting (TF32, bfloat16) or autocast the caller has.
    """
    src = _features_source(qf, gf, metric, "re_ranking_features")
    return _re_rank(src, k1, k2, lambda_value, row_chunk, pair_budget, group)


def _features_source(qf, gf, metric: str, name: str) -> _FeatureSource:
    """The checked features of :func:`re_ranking_features` (and its row-block form)."""
    if metric not in _METRICS:
        raise ValueError(f"{name}: unknown metric {metric!r}; choices: {list(_METRICS)}")
    qf = _as_tensor(qf, "qf")
    gf = _as_tensor(gf, "gf", qf.device)
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(f"{name}: qf and gf dims differ: {tuple(qf.shape)} vs {tuple(gf.shape)}")
    for label, t in (("qf", qf), ("gf", gf)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: {label} must be finite, got NaN or inf")
    dtype = torch.float64 if torch.float64 in (qf.dtype, gf.dtype) else torch.float32
    return _FeatureSource(qf, gf, metric, dtype)


# --- the pipeline ------------------------------------------------------------------------------


def _check_parameters(k1, k2, lambda_value, n) -> None:
    if not isinstance(k1, (int, np.integer)) or k1 < 1:
        raise ValueError(f"re_ranking: k1 must be an integer >= 1, got {k1!r}")
    if not isinstance(k2, (int, np.integer)) or not 1 <= k2 <= n:
        raise ValueError(f"re_ranking: k2 must be an integer in [1, N = Q + G = {n}], got {k2!r}")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"re_ranking: lambda_value must be in [0, 1], got {lambda_value!r}")


class _Shares:
    """This process's queries ``[q0, q1)`` and gallery rows ``[g0, g1)`` (global row numbers:
    queries first), and the all-gather that puts every process's rows back in global order."""

    def __init__(self, num_q: int, num_g: int, group):
        self.group = group
        world, rank = 1, 0
        if group is not None:
            import torch.distributed as dist

            world, rank = dist.get_world_size(group), dist.get_rank(group)
        self.q0, self.q1 = num_q * rank // world, num_q * (rank + 1) // world
        self.g0 = num_q + num_g * rank // world
        self.g1 = num_q + num_g * (rank + 1) // world

    @property
    def rows(self) -> list[tuple[int, int]]:
        return [(self.q0, self.q1), (self.g0, self.g1)]

    def gather(self, q_part: torch.Tensor, g_part: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return torch.cat([q_part, g_part])
        from edaan_fast.ops.evaluation import _all_gather_varlen

        return torch.cat(
            [_all_gather_varlen(q_part, self.group), _all_gather_varlen(g_part, self.group)]
        )


def _csr_rows(ptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor, a: int, b: int):
    """Rows ``a:b`` of a CSR matrix (offsets rebased to 0)."""
    lo, hi = int(ptr[a]), int(ptr[b])
    return ptr[a : b + 1] - lo, col[lo:hi], val[lo:hi]


def _gather_csr(shares: _Shares, ptr, col, val, num_local_q: int):
    """The local CSR rows (this process's queries, then its gallery rows) -> all rows."""
    counts = ptr.diff()
    split = int(ptr[num_local_q])
    counts = shares.gather(counts[:num_local_q], counts[num_local_q:])
    col = shares.gather(col[:split], col[split:])
    val = shares.gather(val[:split], val[split:])
    full = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=full[1:])
    return full, col, val


class _Prepared:
    """Steps 1-3 done: ``out`` holds ``M[q, Q:]`` of this process's queries, the query rows of
    ``V`` (expanded) and the inverted-index input (all gallery rows of ``V``) are ready; step 4
    (:meth:`rerank_rows`) mixes eq. 12 into rows of ``out`` in place."""

    def __init__(self, out, q_csr, g_csr, n, lam):
        self.out, self.q_csr, self.g_csr, self.n, self.lam = out, q_csr, g_csr, n, lam

    def rerank_rows(self, a: int, b: int) -> torch.Tensor:
        """Eq. 10 and 12 for local queries ``a:b``, in place; returns ``out[a:b]``."""
        from edaan_fast.ops import reranking as ops

        rows = self.out[a:b]
        q_ptr, q_col, q_val = _csr_rows(*self.q_csr, a, b)
        ops.jaccard_rerank_(rows, q_ptr, q_col, q_val, *self.g_csr, self.n, self.lam)
        return rows


def _prepare(src: _Source, k1, k2, lambda_value, row_chunk, pair_budget, group):
    """Steps 1-3 of the pipeline; ``None`` for an empty query or gallery set."""
    from edaan_fast.ops import reranking as ops

    num_q, num_g, n = src.num_q, src.num_g, src.n
    dev, dtype = src.device, src.dtype
    if num_g == 0 or num_q == 0:
        _check_parameters(k1, k2 if k2 < 1 else 1, lambda_value, 1)
        return None
    _check_parameters(k1, k2, lambda_value, n)
    lam = float(lambda_value)
    chunk = max(1, row_chunk or src.default_chunk())
    kmax = max(min(k1 + 1, n), k2)
    shares = _Shares(num_q, num_g, group)
    local_q = shares.q1 - shares.q0

    # 1. neighbour lists, row scales, and M[q, Q:] of this process's queries into `out`
    out = torch.empty(local_q, num_g, dtype=dtype, device=dev)
    q_nn, q_nd, q_sc = src.knn_rows(shares.q0, shares.q1, kmax, chunk, out)
    g_nn, g_nd, g_sc = src.knn_rows(shares.g0, shares.g1, kmax, chunk, None)
    nn = shares.gather(q_nn, g_nn)
    nd = shares.gather(q_nd, g_nd)
    scale = shares.gather(q_sc, g_sc)
    del q_nn, q_nd, q_sc, g_nn, g_nd, g_sc

    # 2. V (eq. 7) on R* (eq. 6) of this process's rows, as CSR
    csr = [ops.k_reciprocal_sets(nn, nd, k1, lo, hi) for lo, hi in shares.rows]
    ptr = torch.cat([csr[0][0], csr[1][0][1:] + csr[0][0][-1]])
    col = torch.cat([csr[0][1], csr[1][1]])
    d = torch.cat([csr[0][2], csr[1][2]])
    del csr
    local_rows = torch.cat([torch.arange(lo, hi, device=dev) for lo, hi in shares.rows])
    row_of = torch.repeat_interleave(local_rows, ptr.diff())
    missing = torch.isnan(d).nonzero()[:, 0]
    step = max(1, pair_budget)
    for a in range(0, missing.numel(), step):  # members that came in by expansion only
        e = missing[a : a + step]
        d[e] = src.squared(row_of[e], col[e]) / scale[row_of[e]]
    w = torch.exp(-d)
    sizes = ptr.diff()
    sums = torch.zeros(local_rows.numel(), dtype=dtype, device=dev)
    sums.index_add_(0, torch.repeat_interleave(torch.arange(sizes.numel(), device=dev), sizes), w)
    w /= torch.where(sums > 0, sums, torch.ones_like(sums)).repeat_interleave(sizes)
    del d, row_of, sums
    v_ptr, v_col, v_val = _gather_csr(shares, ptr, col, w, local_q)
    del ptr, col, w

    # 3. local query expansion (eq. 11) of this process's rows
    if k2 > 1:
        qe = [ops.query_expansion(v_ptr, v_col, v_val, nn, k2, lo, hi) for lo, hi in shares.rows]
    else:
        qe = [_csr_rows(v_ptr, v_col, v_val, lo, hi) for lo, hi in shares.rows]
    del v_ptr, v_col, v_val
    (q_ptr, q_col, q_val), (gl_ptr, gl_col, gl_val) = qe

    # the gallery rows of V from every process: the input of step 4's inverted index
    g_counts = shares.gather(gl_ptr[:0], gl_ptr.diff())
    g_ptr = torch.zeros(num_g + 1, dtype=torch.int64, device=dev)
    torch.cumsum(g_counts, 0, out=g_ptr[1:])
    g_col = shares.gather(gl_col[:0], gl_col)
    g_val = shares.gather(gl_val[:0], gl_val)
    return _Prepared(out, (q_ptr, q_col, q_val), (g_ptr, g_col, g_val), n, lam)


def _re_rank(src: _Source, k1, k2, lambda_value, row_chunk, pair_budget, group) -> torch.Tensor:
    prep = _prepare(src, k1, k2, lambda_value, row_chunk, pair_budget, group)
    if prep is None:
        return torch.zeros(src.num_q, src.num_g, dtype=src.dtype, device=src.device)
    # 4. Jaccard (eq. 10) of this process's queries against all gallery rows, and eq. 12 in
    #    place over M[q, Q:]
    out = prep.rerank_rows(0, prep.out.shape[0])
    if group is None:
        return out
    return _Shares(src.num_q, src.num_g, group).gather(out, out[:0])


def _default_query_block(num_g: int, device: torch.device) -> int:
    """Query rows per block of :func:`re_ranking_features_rows`: ``2**24`` values on the CPU;
    on CUDA at least one row for every block the Jaccard kernel keeps resident (16 per SM)."""
    rows = max(1, (1 << 24) // max(num_g, 1))
    if device.type == "cuda":
        rows = max(rows, torch.cuda.get_device_properties(device).multi_processor_count * 16)
    return rows


def re_ranking_features_rows(
    qf: Any,
    gf: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "euclidean",
    row_chunk: int | None = None,
    pair_budget: int = 1 << 21,
    query_block: int | None = None,
):
    """:func:`re_ranking_features`, handed over one block of query rows at a time.

    The inputs and parameters are checked on the call; the work runs as the returned
    :class:`~edaan_fast.ops.evaluation.RowBlocks` is iterated: steps 1-3 (neighbour lists,
    ``V``, its expansion) before the first block, then step 4 (eq. 10 and 12) per block of
    ``query_block`` queries, each block mixed in place into the rows of ``M[q, Q:]`` that step 1
    kept. Feed it to
    :func:`~edaan_fast.ops.evaluation.rank_metrics_from_row_blocks` or a protocol of
    :mod:`edaan_fast.metrics.protocols`: each block is ranked as soon as it is made.

    Every block equals the same rows of :func:`re_ranking_features` with the same arguments, to
    the bit (the Jaccard op computes each query row on its own, in the same order).

    Memory: the one ``[Q, G]`` buffer of ``M[q, Q:]`` (float32 for float32 features; the
    re-ranked rows are written over it, never copied) plus the ``O((Q + G) k)`` tables and
    ``V`` that :func:`re_ranking` lists; a consumer adds what ranking one block needs.

    Args:
        query_block: queries per block (default: ``2**24 // G`` on the CPU; on CUDA at least
            16 rows per SM, to fill the device).
        Others: as :func:`re_ranking_features` (no process group: blocks are produced by one
            process).

    Returns:
        A single-use :class:`~edaan_fast.ops.evaluation.RowBlocks` (iterating it a second time
        raises ``RuntimeError``: the first pass has overwritten ``M``).
    """
    from edaan_fast.ops.evaluation import RowBlocks

    src = _features_source(qf, gf, metric, "re_ranking_features_rows")
    if src.num_q == 0 or src.num_g == 0:  # as _prepare checks them: no k2 bound without rows
        _check_parameters(k1, k2 if k2 < 1 else 1, lambda_value, 1)
    else:
        _check_parameters(k1, k2, lambda_value, src.n)
    num_q, num_g = src.num_q, src.num_g
    if query_block is not None and query_block < 1:
        raise ValueError(f"re_ranking_features_rows: query_block must be >= 1, got {query_block}")
    block = query_block or _default_query_block(num_g, src.device)
    used = []

    def blocks():
        if used:
            raise RuntimeError("re_ranking_features_rows: the blocks were already produced once "
                               "(each is written over M in place); call it again for another pass")
        used.append(True)
        prep = _prepare(src, k1, k2, lambda_value, row_chunk, pair_budget, None)
        if prep is None:
            zeros = torch.zeros(num_q, num_g, dtype=src.dtype, device=src.device)
            yield from ((q0, zeros[q0 : q0 + block]) for q0 in range(0, num_q, block))
            return
        for q0 in range(0, num_q, block):
            yield q0, prep.rerank_rows(q0, min(q0 + block, num_q))

    return RowBlocks((num_q, num_g), src.device, blocks)


def _reference_re_ranking(
    q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3
) -> np.ndarray:
    """The classic per-probe algorithm of the paper in float64 numpy (slow; for tests and
    benchmarks). Stable ``argsort`` (ties: lower index first) and the exact 2/3 test."""
    qg = np.asarray(q_g_dist, dtype=np.float64)
    qq = np.asarray(q_q_dist, dtype=np.float64)
    gg = np.asarray(g_g_dist, dtype=np.float64)
    num_q = qg.shape[0]
    d = np.block([[qq, qg], [qg.T, gg]]) ** 2
    top = d.max(axis=0)
    d = np.transpose(d / np.where(top > 0, top, 1.0))
    n = d.shape[0]
    rank = np.argsort(d, axis=1, kind="stable")

    def reciprocal(i, k):
        fwd = rank[i, : k + 1]
        bwd = rank[fwd, : k + 1]
        return fwd[np.any(bwd == i, axis=1)]

    half = int(np.around(k1 / 2.0))
    V = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = list(r)
        for c in r:
            rc = reciprocal(c, half)
            if 3 * len(np.intersect1d(rc, r)) > 2 * len(rc):
                expanded.extend(rc)
        expanded = np.unique(np.asarray(expanded, dtype=np.int64))
        w = np.exp(-d[i, expanded])
        if w.sum() > 0:
            V[i, expanded] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)])
    jaccard = np.zeros((num_q, n))
    for i in range(num_q):
        inter = np.zeros(n)
        for k in np.nonzero(V[i])[0]:
            js = np.nonzero(V[:, k])[0]
            inter[js] += np.minimum(V[i, k], V[js, k])
        jaccard[i] = 1.0 - inter / (2.0 - inter)
    final = jaccard * (1.0 - lambda_value) + d[:num_q] * lambda_value
    return final[:, num_q:]
