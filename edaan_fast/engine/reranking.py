"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li: "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), batched in torch on the input's device.

Symbols of the paper and where they live here (``N = Q + G`` probes and gallery items together):

* ``d(p, g_i)``: the original distance, squared and normalised by the row maximum
  (``M[i, j] = d(i, j)^2 / max_j' d(i, j')^2``), as the authors' code does; :class:`_Rows`
  produces row blocks of ``M`` from the three distance blocks or from features.
* ``N(p, k)``: the k nearest neighbours, ``nn[:, :k]``, a stable order on (distance, index)
  (:func:`_smallest_k_stable`; ties: the lower index first).
* ``R(p, k) = {g in N(p, k) : p in N(g, k)}`` (eq. 4), with ``k = k1 + 1`` (the probe is its
  own nearest neighbour) and the half-size sets ``R(q, round(k1/2) + 1)`` of eq. 6.
* ``R*(p, k)`` (eq. 6): ``R(p, k)`` plus every ``R(q, k/2)`` of a ``q in R(p, k)`` sharing more
  than 2/3 of its members with ``R(p, k)`` (compared exactly as ``3 |∩| > 2 |R(q, k/2)|``).
* ``V_p`` (eq. 7): weights ``exp(-d(p, g))`` on ``R*(p, k)``, normalised to sum 1; local query
  expansion (eq. 11) averages ``V`` over ``N(p, k2)``.
* ``d_J`` (eq. 10): ``1 - sum min(V_p, V_g) / sum max(V_p, V_g)`` where ``sum max = 2 - sum min``
  (rows sum to 1); ``d* = (1 - lambda) d_J + lambda d`` (eq. 12).

Batched algorithm (no Python loop per probe or per item; loops run over row *chunks* only):

1. per row chunk of ``M``: a stable top-``max(k1+1, k2)`` selection (``topk`` for the
   threshold, masks + ``cumsum`` for the ties at it, a small stable sort of the selected);
2. per row chunk: reciprocity of ``N(p, k)`` by gathering the neighbours' neighbour lists,
   the expansion test by broadcast comparison, de-duplication by a sort of the candidate list,
   and the weights gathered from the recomputed row block: ``V`` is kept sparse (padded
   ``[N, L]`` with ``L = (k1+1) (round(k1/2) + 2)``);
3. query expansion: gather the ``k2`` neighbours' rows of ``V`` and ``scatter_add`` them into a
   dense ``[row_chunk, N]`` scratch (duplicate columns merge), read back with ``nonzero``:
   ``V`` in COO form, sorted by (row, column);
4. Jaccard distance for the query rows only, against the gallery rows only, through an inverted
   (column-sorted) index of ``V``: every (query entry, gallery entry) pair sharing a column is
   expanded with ``repeat_interleave`` and its ``min`` scattered with ``index_add``, in chunks of
   at most ``pair_budget`` pairs.

Peak memory beyond the inputs and the ``Q x G`` output: one row block of ``M``
(``row_chunk x N``; about ``row_chunk * N * (itemsize + 10)`` bytes with the tie masks and the
``cumsum``), the neighbour table ``N * max(k1+1, k2) * 8`` bytes, ``V`` padded
(``N * L * (8 + itemsize)`` bytes; 252 entries per row with the defaults), the query-expansion
scratch (``row_chunk * N`` values plus the ``row_chunk * k2 * L`` gathered entries), ``V``
merged (``nnz * (16 + itemsize)`` bytes, ``nnz <= N * k2 * L``) and its column-sorted copy of
the gallery rows, the ``Q x G`` Jaccard accumulator, and ``pair_budget * ~40`` bytes for the
Jaccard pairs. ``row_chunk`` defaults to ``max(1, 2**22 // N)`` rows, so each row-chunk buffer
is a few tens of MiB. From features, ``M`` is never materialised (each row block is one GEMM);
from distance blocks the caller holds the ``N x N`` entries already and nothing ``N x N`` is
added.

Ties are broken by the lower index everywhere (the authors' ``argsort`` is not stable), so the
result equals :func:`_reference_re_ranking`, the classic per-probe loop, up to float rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["re_ranking", "re_ranking_features"]

_METRICS = ("euclidean", "cosine")


def _as_tensor(x: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if device is not None:
        t = t.to(device)
    if not t.dtype.is_floating_point:
        t = t.to(torch.float64)
    if t.dim() != 2:
        raise ValueError(f"re_ranking: {name} must be 2-D, got shape {tuple(t.shape)}")
    return t


class _Rows:
    """Row blocks of the normalised squared distance ``M`` over all ``N = Q + G`` items.

    Row ``i`` of ``M`` is *column* ``i`` of the stacked matrix ``[[q_q, q_g], [q_g^T, g_g]]``
    squared and divided by its maximum (the authors normalise columns, then transpose): the
    same as the row for symmetric ``q_q``/``g_g``, and exact for any input.
    """

    def __init__(self, num_q: int, num_g: int, dtype: torch.dtype, device: torch.device):
        self.num_q, self.num_g = num_q, num_g
        self.n = num_q + num_g
        self.dtype, self.device = dtype, device

    def raw(self, r0: int, r1: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, r0: int, r1: int) -> torch.Tensor:
        d = self.raw(r0, r1).to(self.dtype)
        d = d * d
        if bool(torch.isnan(d).any()):
            raise ValueError(f"re_ranking: the distances of items {r0}..{r1 - 1} contain NaN")
        top = d.amax(1, keepdim=True)
        return d.div_(torch.where(top > 0, top, torch.ones_like(top)))

    def entries(
        self, r0: int, r1: int, idx: torch.Tensor, row_max: torch.Tensor | None
    ) -> torch.Tensor:
        """``M[r0 + b, idx[b, c]]`` for a ``[B, C]`` index (default: from the row block)."""
        return self(r0, r1).gather(1, idx)

    def query_gallery(self, q0: int, q1: int, row_max: torch.Tensor | None) -> torch.Tensor:
        """``M[q0:q1, Q:]``."""
        return self(q0, q1)[:, self.num_q :]


class _BlockRows(_Rows):
    def __init__(self, q_g, q_q, g_g, dtype):
        super().__init__(q_g.shape[0], q_g.shape[1], dtype, q_g.device)
        self.q_g, self.q_q, self.g_g = q_g.contiguous(), q_q.contiguous(), g_g.contiguous()

    def raw(self, r0, r1):
        parts = []
        q0, q1 = min(r0, self.num_q), min(r1, self.num_q)
        if q1 > q0:  # query rows: [q_q[:, i], q_g[i, :]]
            parts.append(torch.cat([self.q_q[:, q0:q1].t(), self.q_g[q0:q1]], 1).to(self.dtype))
        g0, g1 = max(r0, self.num_q) - self.num_q, max(r1, self.num_q) - self.num_q
        if g1 > g0:  # gallery rows: [q_g[:, j], g_g[:, j]]
            parts.append(
                torch.cat([self.q_g[:, g0:g1].t(), self.g_g[:, g0:g1].t()], 1).to(self.dtype)
            )
        return torch.cat(parts, 0) if len(parts) > 1 else parts[0]

    def entries(self, r0, r1, idx, row_max):
        # M[i, j] = stacked[j, i]^2 / max_i, read from the block that holds stacked[j, i]
        nq = self.num_q
        i = torch.arange(r0, r1, device=idx.device)[:, None].expand_as(idx)
        j = idx
        iq, jq = i < nq, j < nq
        qq = self.q_q.reshape(-1)[j.clamp_max(nq - 1) * nq + i.clamp_max(nq - 1)]
        qg_ji = self.q_g.reshape(-1)[
            j.clamp_max(nq - 1) * self.num_g + (i - nq).clamp(0, self.num_g - 1)
        ]
        qg_ij = self.q_g.reshape(-1)[
            i.clamp_max(nq - 1) * self.num_g + (j - nq).clamp(0, self.num_g - 1)
        ]
        gg = self.g_g.reshape(-1)[(j - nq).clamp_min(0) * self.num_g + (i - nq).clamp_min(0)]
        v = torch.where(jq, torch.where(iq, qq, qg_ji), torch.where(iq, qg_ij, gg)).to(self.dtype)
        return v * v / row_max[r0:r1, None]

    def query_gallery(self, q0, q1, row_max):
        v = self.q_g[q0:q1].to(self.dtype)
        return v * v / row_max[q0:q1, None]


class _FeatureRows(_Rows):
    def __init__(self, qf, gf, metric, dtype):
        super().__init__(qf.shape[0], gf.shape[0], dtype, qf.device)
        f = torch.cat([qf, gf], 0).to(dtype)
        if metric == "cosine":
            f = F.normalize(f, dim=1)
        self.f, self.metric = f, metric
        self.sq = (f * f).sum(1)

    def raw(self, r0, r1):
        dot = self.f[r0:r1] @ self.f.t()
        if self.metric == "cosine":
            return 1.0 - dot
        d2 = self.sq[r0:r1, None] + self.sq[None, :] - 2.0 * dot
        return d2.clamp_min(1e-12).sqrt()


def _smallest_k_stable(d: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest entries of each row, ordered by (value, index).

    ``topk`` gives the k-th smallest value ``t`` (whatever its tie order); every entry ``< t``
    is in, and of the entries ``== t`` the lowest-indexed ones fill the remaining slots.
    """
    rows = d.shape[0]
    t = torch.topk(d, k, dim=1, largest=False, sorted=True).values[:, -1:]
    less = d < t
    eq = d == t
    need = k - less.sum(1, keepdim=True)
    sel = less | (eq & (torch.cumsum(eq, 1, dtype=torch.int32) <= need))
    idx = sel.nonzero()[:, 1].view(rows, k)  # row-major: ascending index within a row
    order = torch.sort(d.gather(1, idx), dim=1, stable=True).indices
    return idx.gather(1, order)


def _reciprocal_mask(nn: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, k]`` bool: ``nn[i, c]`` has ``i`` among its own first ``k`` neighbours."""
    fwd = nn[rows, :k]
    return (nn[fwd, :k] == rows[:, None, None]).any(-1)


def re_ranking(
    q_g_dist: Any,
    q_q_dist: Any,
    g_g_dist: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    row_chunk: int | None = None,
    pair_budget: int = 1 << 21,
) -> torch.Tensor:
    """k-reciprocal re-ranking of a query/gallery distance matrix.

    Args:
        q_g_dist: ``[Q, G]`` query-gallery distances; q_q_dist ``[Q, Q]``; g_g_dist ``[G, G]``
            (numpy arrays or tensors; computed on ``q_g_dist``'s device, in float64 for float64
            input and float32 otherwise). Distances, not squared: they are squared here, as in
            the authors' code.
        k1, k2, lambda_value: the paper's ``k1`` (reciprocal neighbourhood), ``k2`` (local
            query expansion; 1 turns it off) and ``lambda`` (weight of the original distance).
        row_chunk: rows of the ``N x N`` problem handled at once (default ``2**22 // N``).
        pair_budget: most (query entry, gallery entry) pairs expanded at once in the Jaccard
            step.

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
    return _re_rank(_BlockRows(qg, qq, gg, dtype), k1, k2, lambda_value, row_chunk, pair_budget)


def re_ranking_features(
    qf: Any,
    gf: Any,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: str = "euclidean",
    row_chunk: int | None = None,
    pair_budget: int = 1 << 21,
) -> torch.Tensor:
    """:func:`re_ranking` from ``[Q, D]`` query and ``[G, D]`` gallery features.

    The distance is the euclidean distance (``"euclidean"``, squared inside as in the paper's
    code) or ``1 - cos`` (``"cosine"``). Row blocks are computed by one GEMM each, so no
    ``N x N`` matrix is ever held; only the ``[Q, G]`` result.
    """
    if metric not in _METRICS:
        raise ValueError(
            f"re_ranking_features: unknown metric {metric!r}; choices: {list(_METRICS)}"
        )
    qf = _as_tensor(qf, "qf")
    gf = _as_tensor(gf, "gf", qf.device)
    if qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"re_ranking_features: qf and gf dims differ: {tuple(qf.shape)} vs {tuple(gf.shape)}"
        )
    dtype = torch.float64 if torch.float64 in (qf.dtype, gf.dtype) else torch.float32
    return _re_rank(
        _FeatureRows(qf, gf, metric, dtype), k1, k2, lambda_value, row_chunk, pair_budget
    )


def _re_rank(rows_of: _Rows, k1, k2, lambda_value, row_chunk, pair_budget) -> torch.Tensor:
    if k1 < 1 or k2 < 1:
        raise ValueError(f"re_ranking: k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"re_ranking: lambda_value must be in [0, 1], got {lambda_value}")
    num_q, n = rows_of.num_q, rows_of.n
    dev, dtype = rows_of.device, rows_of.dtype
    if rows_of.num_g == 0 or num_q == 0:
        return torch.zeros(num_q, rows_of.num_g, dtype=dtype, device=dev)
    chunk = row_chunk or max(1, (1 << 22) // n)
    ka = min(k1 + 1, n)  # |N(p, k1 + 1)|, cut to the problem size as argsort[:k] would be
    kh = min(round(k1 / 2) + 1, n)  # |N(q, k1/2 + 1)| (banker's rounding, like np.around)
    kq = min(k2, n)
    kmax = max(ka, kq)

    # 1. neighbour table
    nn = torch.empty(n, kmax, dtype=torch.int64, device=dev)
    row_max = torch.empty(n, dtype=dtype, device=dev)  # max_j d(i, j)^2 (1 where 0)
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        m = rows_of.raw(r0, r1).to(dtype)
        m = m * m
        if bool(torch.isnan(m).any()):
            raise ValueError(f"re_ranking: the distances of items {r0}..{r1 - 1} contain NaN")
        top = m.amax(1)
        row_max[r0:r1] = torch.where(top > 0, top, torch.ones_like(top))
        nn[r0:r1] = _smallest_k_stable(m.div_(row_max[r0:r1, None]), kmax)

    # 2. R(p, k1+1) and R(p, k1/2+1) masks for all rows
    rec_a = torch.empty(n, ka, dtype=torch.bool, device=dev)
    rec_h = torch.empty(n, kh, dtype=torch.bool, device=dev)
    for r0 in range(0, n, chunk):
        rows = torch.arange(r0, min(r0 + chunk, n), device=dev)
        rec_a[r0 : r0 + rows.numel()] = _reciprocal_mask(nn, rows, ka)
        rec_h[r0 : r0 + rows.numel()] = _reciprocal_mask(nn, rows, kh)

    # 3. V (eq. 7) on R*(p, k) (eq. 6): padded [n, L] with sentinel column n
    width = ka * (kh + 1)
    v_idx = torch.empty(n, width, dtype=torch.int64, device=dev)
    v_val = torch.empty(n, width, dtype=dtype, device=dev)
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        b = r1 - r0
        cand = nn[r0:r1, :ka]
        cand_ok = rec_a[r0:r1]  # [b, ka]
        rset = torch.where(cand_ok, cand, -1)
        half = nn[cand, :kh]  # [b, ka, kh]
        half_ok = rec_h[cand]  # [b, ka, kh]
        inter = ((half[..., None] == rset[:, None, None, :]).any(-1) & half_ok).sum(-1)
        accept = cand_ok & (3 * inter > 2 * half_ok.sum(-1))
        ext = torch.where(half_ok & accept[..., None], half, n).reshape(b, ka * kh)
        idx = torch.cat([torch.where(cand_ok, cand, n), ext], 1)
        idx = torch.sort(idx, dim=1).values
        dup = torch.zeros_like(idx, dtype=torch.bool)
        dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
        idx = torch.where(dup, n, idx)
        ok = idx < n
        w = torch.exp(-rows_of.entries(r0, r1, idx.clamp_max(n - 1), row_max)) * ok
        s = w.sum(1, keepdim=True)
        v_idx[r0:r1] = idx
        v_val[r0:r1] = torch.where(s > 0, w / torch.where(s > 0, s, torch.ones_like(s)), w)

    # 4. local query expansion (eq. 11): per row chunk, the k2 rows summed into a dense
    #    [B, N] scratch (duplicate columns merge), read back in (row, col) order -> COO
    coo_r, coo_c, coo_v = [], [], []
    for r0 in range(0, n, chunk):
        r1 = min(r0 + chunk, n)
        b = r1 - r0
        if kq > 1:
            nb = nn[r0:r1, :kq]  # [b, kq]
            cols = v_idx[nb].reshape(b, -1)
            vals = (v_val[nb] / kq).reshape(b, -1)
        else:
            cols, vals = v_idx[r0:r1], v_val[r0:r1]
        dense = torch.zeros(b, n + 1, dtype=dtype, device=dev)  # column n: the padding
        dense.scatter_add_(1, cols, vals)
        dense = dense[:, :n]
        nz = dense.nonzero()
        coo_r.append(nz[:, 0] + r0)
        coo_c.append(nz[:, 1])
        coo_v.append(dense[nz[:, 0], nz[:, 1]])
    row, col, val = torch.cat(coo_r), torch.cat(coo_c), torch.cat(coo_v)

    # 5. Jaccard distance (eq. 10) of query rows against gallery rows, via the inverted index
    is_g = row >= num_q
    g_col, order = torch.sort(col[is_g], stable=True)
    g_row = row[is_g][order] - num_q
    g_val = val[is_g][order]
    col_cnt = torch.bincount(g_col, minlength=n)
    col_ptr = torch.cumsum(col_cnt, 0) - col_cnt
    is_q = ~is_g
    q_row, q_col, q_val = row[is_q], col[is_q], val[is_q]
    pairs = col_cnt[q_col]  # gallery entries sharing each query entry's column
    num_g = rows_of.num_g
    inter = torch.zeros(num_q * num_g, dtype=dtype, device=dev)
    ends = torch.cumsum(pairs, 0)
    total = int(ends[-1]) if ends.numel() else 0
    start = 0
    while start < q_row.numel() and total > 0:
        base = int(ends[start - 1]) if start > 0 else 0
        stop = int(torch.searchsorted(ends, base + pair_budget, right=True))
        stop = max(stop, start + 1)
        cnt = pairs[start:stop]
        e = torch.repeat_interleave(torch.arange(start, stop, device=dev), cnt)
        if e.numel():
            within = torch.arange(e.numel(), device=dev) - (
                torch.cumsum(cnt, 0) - cnt
            ).repeat_interleave(cnt)
            gpos = col_ptr[q_col[e]] + within
            mins = torch.minimum(q_val[e], g_val[gpos])
            inter.index_add_(0, q_row[e] * num_g + g_row[gpos], mins)
        start = stop
    inter = inter.view(num_q, num_g)
    jaccard = 1.0 - inter / (2.0 - inter)

    # 6. final distance (eq. 12)
    out = torch.empty(num_q, num_g, dtype=dtype, device=dev)
    for r0 in range(0, num_q, chunk):
        r1 = min(r0 + chunk, num_q)
        out[r0:r1] = (
            jaccard[r0:r1] * (1.0 - lambda_value)
            + rows_of.query_gallery(r0, r1, row_max) * lambda_value
        )
    return out


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
