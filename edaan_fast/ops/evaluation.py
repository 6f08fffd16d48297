"""Re-ID ranking evaluation (CMC, mAP, mINP) without sorting the distance matrix.

Entry points:

* :func:`evaluate_rank` -- drop-in for ``torchreid.metrics.evaluate_rank``: same arguments,
  same ``(cmc, mAP)`` return (cmc a float32 numpy array, mAP a float).
* :func:`rank_metrics` -- :class:`RankMetrics` with mINP, per-query AP and the valid-query
  mask; optionally over a gallery sharded across ``torch.distributed`` processes.
* :func:`rank_metrics_from_features` -- from query/gallery features, computing the distances
  tile by tile and never holding the whole ``Q x G`` matrix.
* :func:`rank_metrics_from_row_blocks` -- from a :class:`RowBlocks`, a ``Q x G`` matrix handed
  over one block of query rows at a time (re-ranked distances as they are produced).

Protocol (Market-1501 / DukeMTMC-reID, torchreid's ``eval_market1501``): for each query the
gallery items with the query's pid *and* camera are dropped (junk); a query with no remaining
positive is skipped; ranking is a stable order on (distance, gallery index), so equal distances
rank the lower gallery index first.

Algorithm (no sort): a positive's rank is the number of valid gallery items that precede it.
Per query, the positives (known from the pids and cameras; usually 10-20) are gathered and
sorted; one pass over the gallery counts the negatives preceding each positive
(``torch.ops.edaan_fast._rank_count_preceding``: a compare against the farthest positive, a
binary search for the rare closer ones). From the ranks ``r_1 < ... < r_P``:
``AP = (1/P) sum_k k / (r_k + 1)``, the CMC hit is at ``r_1``, ``INP = P / (r_P + 1)``.
O(G log P) per query instead of O(G log G), parallel over queries, additive over gallery
blocks.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .rank_eval import distance_gemm, rank_count_preceding, rank_sort_positives

__all__ = [
    "RankMetrics",
    "RowBlocks",
    "evaluate_rank",
    "pairwise_distance",
    "rank_metrics",
    "rank_metrics_from_features",
    "rank_metrics_from_row_blocks",
]

logger = logging.getLogger(__name__)

_METRICS = ("euclidean", "cosine")


@dataclass
class RankMetrics:
    """Result of :func:`rank_metrics`.

    Attributes:
        cmc: float32 numpy ``[min(max_rank, num_gallery)]``; ``cmc[r]`` = fraction of the valid
            queries whose first positive is at rank <= r (torchreid's definition and length).
        mAP: mean average precision over the valid queries.
        mINP: mean inverse negative penalty (``P / (r_P + 1)``, fast-reid's mINP).
        ap_per_query: float64 numpy ``[Q]``, NaN for a query without a positive.
        valid: bool numpy ``[Q]``: the query has at least one positive after dropping junk.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    ap_per_query: np.ndarray
    valid: np.ndarray


# --- input handling ---------------------------------------------------------------------------


def as_tensor(x: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    """``x`` as a tensor: a tensor as it is (detached), anything numpy reads as a numeric array
    through ``np.asarray`` -- negative or other strides, non-contiguous views, non-native byte
    order, any integer, float or bool dtype, lists -- copied only when torch cannot view it
    (negative strides, byte order, dtypes torch lacks: ``uint16``/``uint32``/``uint64`` become
    int64 or float64, ``longdouble`` float64). The one converter of the evaluation inputs.

    Raises:
        TypeError: ``x`` is not an array of numbers (strings, objects, ragged lists), naming
            ``name``, the type and the dtype that came.
    """
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            a = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"rank_metrics: {name} must be an array of numbers (numpy array, "
                            f"tensor or nested lists), got {type(x).__name__} that numpy cannot "
                            f"read as one ({exc})") from None
        if a.dtype.kind not in "biuf":
            raise TypeError(f"rank_metrics: {name} must be an array of numbers, got "
                            f"{type(x).__name__} of dtype {a.dtype}")
        if a.dtype.kind == "u" and a.dtype.itemsize > 1:
            a = a.astype(np.int64 if a.dtype.itemsize < 8 else np.float64)
        elif a.dtype.kind == "f" and a.dtype.itemsize > 8:
            a = a.astype(np.float64)
        elif not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        if any(s < 0 for s in a.strides):
            a = a.copy()
        t = torch.from_numpy(a)
    if device is not None and t.device != device:
        t = t.to(device)
    return t


def _as_ids(x: Any, name: str, n: int, what: str) -> np.ndarray:
    """Integer ids as a host int64 numpy array (the bookkeeping runs on the host: it is small,
    and single-threaded numpy does not contend for the cores the kernels use)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"rank_metrics: {name} must be 1-D with {n} entries ({what}), got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"rank_metrics: {name} must hold integer ids, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


@dataclass
class _Ids:
    q_pids: np.ndarray
    g_pids: np.ndarray
    q_camids: np.ndarray
    g_camids: np.ndarray
    q_pids_dev: torch.Tensor
    g_pids_dev: torch.Tensor
    g_offset: int
    num_g: int  # global gallery size


def _ids(q_pids, g_pids, q_camids, g_camids, num_q, num_local, dev, group, g_offset, rows, cols) -> _Ids:
    q_pids = _as_ids(q_pids, "q_pids", num_q, f"one per {rows} row")
    q_camids = _as_ids(q_camids, "q_camids", num_q, f"one per {rows} row")
    g_pids = _as_ids(g_pids, "g_pids", num_local, f"one per {cols}")
    g_camids = _as_ids(g_camids, "g_camids", num_local, f"one per {cols}")
    if group is None:
        if g_offset not in (None, 0):
            raise ValueError("rank_metrics: g_offset is only meaningful with a process group")
        g_offset, num_g = 0, num_local
    else:
        g_offset, num_g = _dist_shard_layout(num_local, group, g_offset, dev)
    if num_g == 0:
        raise ValueError("rank_metrics: the gallery is empty")
    return _Ids(
        q_pids, g_pids, q_camids, g_camids,
        torch.from_numpy(q_pids).to(dev), torch.from_numpy(g_pids).to(dev), g_offset, num_g,
    )


def _as_distmat(distmat: Any) -> torch.Tensor:
    d = as_tensor(distmat, "distmat")
    if d.dim() != 2:
        raise ValueError(
            f"rank_metrics: distmat must be 2-D [num_query, num_gallery], got shape {tuple(d.shape)}"
        )
    if not d.dtype.is_floating_point:
        d = d.to(torch.float64)
    if d.stride(-1) != 1 and d.shape[1] > 1:
        d = d.contiguous()
    return d


# --- the three phases -------------------------------------------------------------------------


def _positives(ids: _Ids) -> tuple[np.ndarray, np.ndarray]:
    """(query index, local gallery column) of every positive -- same pid, another camera --
    grouped by query, gallery index ascending. O(G log G + Q log G + positives) on the host;
    no Q x G mask."""
    perm = np.argsort(ids.g_pids, kind="stable")
    g_sorted = ids.g_pids[perm]
    lo = np.searchsorted(g_sorted, ids.q_pids, side="left")
    n = np.searchsorted(g_sorted, ids.q_pids, side="right") - lo
    qi = np.repeat(np.arange(ids.q_pids.shape[0], dtype=np.int64), n)
    within = np.arange(qi.shape[0], dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)
    gl = perm[np.repeat(lo, n) + within]  # ascending within a query (stable argsort)
    keep = ids.g_camids[gl] != ids.q_camids[qi]
    return qi[keep], gl[keep]


def _gather(d: torch.Tensor, qi: np.ndarray, gl: np.ndarray) -> torch.Tensor:
    """d[qi, gl]; on the host through numpy (single-threaded: a small gather is not worth
    waking a thread pool, which on a loaded machine costs more than the gather)."""
    if d.device.type == "cpu" and d.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(d.numpy()[qi, gl])
    return d[torch.from_numpy(qi).to(d.device), torch.from_numpy(gl).to(d.device)]


@dataclass
class _Positives:
    qi: np.ndarray  # [P_total] query of each positive (host)
    offsets: np.ndarray  # [Q + 1] CSR (host)
    offsets_dev: torch.Tensor
    dist: torch.Tensor  # [P_total] sorted per query by (distance, global index)
    gidx: torch.Tensor  # [P_total] global gallery index


def _positive_set(ids: _Ids, qi: np.ndarray, gl: np.ndarray, pd: torch.Tensor, group) -> _Positives:
    """Phase (a): every positive of every query (from all processes), sorted per query."""
    dev = pd.device
    num_q = ids.q_pids.shape[0]
    gi = torch.from_numpy(gl + ids.g_offset).to(dev)
    if group is not None:
        qi_t, gi, pd = _gather_positives(torch.from_numpy(qi).to(dev), gi, pd, group)
        qi = qi_t.cpu().numpy()
        order = np.argsort(qi, kind="stable")
        qi = qi[order]
        order_t = torch.from_numpy(order).to(dev)
        gi, pd = gi[order_t], pd[order_t]
    # A NaN among the positives sorts last and makes the count step flag the query.
    offsets = np.zeros(num_q + 1, dtype=np.int64)
    np.cumsum(np.bincount(qi, minlength=num_q), out=offsets[1:])
    offsets_dev = torch.from_numpy(offsets).to(dev)
    pd, gi = rank_sort_positives(offsets_dev, pd, gi)
    return _Positives(qi, offsets, offsets_dev, pd, gi)


def _finalize(counts: torch.Tensor, pos: _Positives, num_g: int, max_rank: int) -> RankMetrics:
    """Phase (c): ranks -> CMC, AP, INP (float64, on the host)."""
    counts = counts.cpu().numpy()
    qi, offsets = pos.qi, pos.offsets
    num_q = offsets.shape[0] - 1
    if (counts < 0).any():
        q = int(qi[counts < 0][0])
        raise ValueError(f"rank_metrics: the distances of query {q} contain NaN")
    k = np.arange(qi.shape[0], dtype=np.int64) - offsets[qi]  # 0-based index among positives
    ranks = counts + k
    num_pos = np.diff(offsets)
    valid = num_pos > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            "rank_metrics: no query has a positive in the gallery (a gallery item with the query's "
            "pid from another camera); check that the query and gallery ids/cameras belong together"
        )
    terms = (k + 1).astype(np.float64) / (ranks + 1).astype(np.float64)
    ap = np.bincount(qi, weights=terms, minlength=num_q)
    ap = np.where(valid, ap / np.maximum(num_pos, 1), np.nan)
    first = ranks[offsets[:-1][valid]]
    last = ranks[offsets[1:][valid] - 1]
    inp = num_pos[valid] / (last + 1.0)
    max_rank = min(max_rank, num_g)
    hits = np.bincount(np.minimum(first, max_rank), minlength=max_rank + 1)[:max_rank]
    cmc = np.cumsum(hits).astype(np.float32) / np.float32(num_valid)
    return RankMetrics(cmc=cmc, mAP=float(ap[valid].mean()), mINP=float(inp.mean()),
                       ap_per_query=ap, valid=valid)


# --- distributed helpers ----------------------------------------------------------------------


def _dist_shard_layout(num_local: int, group, g_offset: int | None, device) -> tuple[int, int]:
    """(global offset of this rank's first gallery column, global gallery size)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([num_local], dtype=torch.int64, device=device), group=group)
    sizes = [int(s) for s in sizes]
    if g_offset is None:
        g_offset = sum(sizes[: dist.get_rank(group)])
    return g_offset, sum(sizes)


def _all_gather_varlen(t: torch.Tensor, group) -> torch.Tensor:
    """Every process's ``t`` (sizes may differ along dim 0), concatenated in rank order."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    width = max(sizes) if sizes else 0
    padded = torch.zeros((width,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def _gather_positives(qi, gi, pd, group):
    """Every process gets every positive (query, global index, distance)."""
    return (
        _all_gather_varlen(qi, group),
        _all_gather_varlen(gi, group),
        _all_gather_varlen(pd, group),
    )


# --- public API -------------------------------------------------------------------------------


def rank_metrics(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
    group: Any = None,
    g_offset: int | None = None,
) -> RankMetrics:
    """CMC, mAP, mINP and per-query AP from a ``[Q, G]`` distance matrix, without sorting it.

    Args:
        distmat: ``[Q, G]`` distances (numpy array or tensor, any float dtype, CPU or CUDA;
            smaller = more similar). Compared exactly in its own dtype.
        q_pids, q_camids: ``[Q]`` integer ids of the queries; g_pids, g_camids: ``[G]``.
        max_rank: length of the CMC curve (cut to the gallery size, as torchreid does).
        group: a ``torch.distributed`` process group (or ``torch.distributed.group.WORLD``) to
            evaluate a gallery sharded over processes. Then every process passes *all* queries
            (the same ``q_pids``/``q_camids``, in the same order) and *its* gallery shard: the
            columns ``distmat[:, j]`` are the global gallery items ``g_offset + j`` and
            ``g_pids``/``g_camids`` are that shard's. ``g_offset=None`` means shards follow each
            other in rank order (rank r's shard starts after the shards of ranks < r). Ties break
            on the global index, per-query counts are all-reduced, and every process returns the
            result the whole matrix would give on one process, exactly.
        g_offset: global index of column 0 (only with ``group``; default: rank order).

    Returns:
        :class:`RankMetrics`.

    Raises:
        ValueError: wrong shapes or lengths, NaN distances in the row of a query that has a
            positive, or no query with a positive.
    """
    d = _as_distmat(distmat)
    if max_rank < 1:
        raise ValueError(f"rank_metrics: max_rank must be >= 1, got {max_rank}")
    num_q, num_local = d.shape
    ids = _ids(q_pids, g_pids, q_camids, g_camids, num_q, num_local, d.device, group, g_offset,
               "distmat", "distmat column")
    qi, gl = _positives(ids)
    pd = _gather(d, qi, gl)
    pos = _positive_set(ids, qi, gl, pd, group)
    counts = rank_count_preceding(d, ids.q_pids_dev, ids.g_pids_dev, pos.offsets_dev, pos.dist,
                                  pos.gidx, ids.g_offset)
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, group=group)
    return _finalize(counts, pos, ids.num_g, max_rank)


def evaluate_rank(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
    use_metric_cuhk03: bool = False,
    use_cython: bool = True,
):
    """Drop-in for ``torchreid.metrics.evaluate_rank``: returns ``(cmc, mAP)``.

    ``cmc`` is a float32 numpy array of length ``min(max_rank, num_gallery)`` (torchreid warns
    and cuts ``max_rank`` to the gallery size; so does this, with a ``UserWarning``), ``mAP`` a
    float. Inputs: numpy arrays or tensors, any float dtype, CPU or CUDA. ``use_cython`` is
    accepted and ignored (there is one implementation). ``use_metric_cuhk03=True`` (CUHK03's
    single-gallery-shot protocol) is not provided here and raises ``NotImplementedError``.
    """
    del use_cython
    if use_metric_cuhk03:
        raise NotImplementedError(
            "evaluate_rank: the CUHK03 single-gallery-shot protocol (use_metric_cuhk03=True) is not "
            "implemented by edaan_fast.ops.evaluate_rank; it covers the Market-1501/Duke protocol"
        )
    distmat = _as_distmat(distmat)
    num_g = distmat.shape[1]
    if num_g < max_rank:
        warnings.warn(
            f"evaluate_rank: the gallery has {num_g} items, fewer than max_rank={max_rank}; "
            f"the CMC curve is cut to {num_g}",
            stacklevel=2,
        )
    m = rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)
    return m.cmc, m.mAP


# --- from blocks of query rows -----------------------------------------------------------------


@dataclass
class RowBlocks:
    """A ``[Q, G]`` distance matrix handed over one block of query rows at a time.

    ``blocks()`` yields ``(q0, block)`` pairs: ``block`` holds the distances of queries
    ``q0 .. q0 + len(block) - 1`` to every gallery item (``[rows, G]``, rows contiguous), the
    blocks in query order and covering ``0 .. Q`` once. A block is read before the next is
    asked for, so a producer may reuse or overwrite its memory afterwards.
    :func:`rank_metrics_from_row_blocks` and the protocols of :mod:`edaan_fast.metrics.protocols`
    rank it; :func:`edaan_fast.metrics.reranking.re_ranking_features_rows` produces one.

    Attributes:
        shape: ``(Q, G)``.
        device: where the blocks live.
        blocks: a callable returning the iterator of ``(q0, block)`` (called once).
    """

    shape: tuple[int, int]
    device: torch.device
    blocks: Callable[[], Iterator[tuple[int, torch.Tensor]]]

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        num_q, num_g = self.shape
        expected = 0
        for q0, block in self.blocks():
            if q0 != expected or block.dim() != 2 or block.shape[1] != num_g or \
                    q0 + block.shape[0] > num_q:
                raise ValueError(f"RowBlocks: expected the block of queries from {expected} "
                                 f"with {num_g} columns, got queries from {q0}, shape "
                                 f"{tuple(block.shape)}")
            expected = q0 + block.shape[0]
            yield q0, block
        if expected != num_q:
            raise ValueError(f"RowBlocks: the blocks ended at query {expected} of {num_q}")

    @classmethod
    def of(cls, distmat: torch.Tensor) -> RowBlocks:
        """The whole matrix as one block."""
        return cls(tuple(distmat.shape), distmat.device, lambda: iter([(0, distmat)]))


class RowBlockRanker:
    """Phases (a) and (b) of :func:`rank_metrics` one block of query rows at a time.

    The positives of every query come from the ids alone (before any distance); each
    :meth:`add` gathers its block's positive distances, sorts them per query and counts the
    negatives that precede each one -- the same ops on the same rows as :func:`rank_metrics`,
    so :meth:`result` equals it exactly. Holds ``O(Q + G + positives)``.
    """

    def __init__(self, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any,
                 shape: tuple[int, int], device: torch.device, max_rank: int = 50):
        if max_rank < 1:
            raise ValueError(f"rank_metrics: max_rank must be >= 1, got {max_rank}")
        num_q, num_g = shape
        self.ids = _ids(q_pids, g_pids, q_camids, g_camids, num_q, num_g, device, None, None,
                        "distmat", "distmat column")
        self.qi, self.gl = _positives(self.ids)
        offsets = np.zeros(num_q + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.qi, minlength=num_q), out=offsets[1:])
        self.offsets = offsets
        self.offsets_dev = torch.from_numpy(offsets).to(device)
        self.gl_dev = torch.from_numpy(self.gl).to(device)
        self.counts = torch.zeros(self.qi.shape[0], dtype=torch.int64, device=device)
        self.max_rank = max_rank
        self.num_q, self.num_g = num_q, num_g

    @property
    def valid(self) -> np.ndarray:
        """bool ``[Q]``: the query has a positive (known before any distance is read)."""
        return np.diff(self.offsets) > 0

    def add(self, q0: int, block: torch.Tensor) -> None:
        """Counts for queries ``q0 .. q0 + len(block) - 1`` from their ``[rows, G]`` distances."""
        d = _as_distmat(block)
        q1 = q0 + d.shape[0]
        p0, p1 = int(self.offsets[q0]), int(self.offsets[q1])
        if p1 == p0:
            return
        pd = _gather(d, self.qi[p0:p1] - q0, self.gl[p0:p1])
        off = self.offsets_dev[q0 : q1 + 1] - p0
        pd, gi = rank_sort_positives(off, pd.to(d.device), self.gl_dev[p0:p1])
        self.counts[p0:p1] = rank_count_preceding(d, self.ids.q_pids_dev[q0:q1],
                                                  self.ids.g_pids_dev, off, pd, gi, 0)

    def result(self) -> RankMetrics:
        """Phase (c): CMC, mAP, mINP of every query added."""
        pos = _Positives(self.qi, self.offsets, self.offsets_dev, self.counts, self.counts)
        return _finalize(self.counts, pos, self.num_g, self.max_rank)


def rank_metrics_from_row_blocks(
    blocks: RowBlocks,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
) -> RankMetrics:
    """:func:`rank_metrics` of a matrix that comes one block of query rows at a time.

    Each block is ranked as it arrives (its queries' positives gathered, sorted, and the
    preceding negatives counted), and only the per-positive counts are kept: the result equals
    :func:`rank_metrics` of the whole matrix exactly, and nothing of size ``Q x G`` is held
    here (peak: the largest block plus ``O(Q + G + positives)``).
    """
    ranker = RowBlockRanker(q_pids, g_pids, q_camids, g_camids, blocks.shape, blocks.device,
                            max_rank)
    for q0, block in blocks:
        ranker.add(q0, block)
    return ranker.result()


# --- from features ----------------------------------------------------------------------------


def _prepare_features(qf, gf, metric: str):
    if metric not in _METRICS:
        raise ValueError(f"rank_metrics_from_features: unknown metric {metric!r}; choices: {list(_METRICS)}")
    qf = as_tensor(qf, "qf")
    gf = as_tensor(gf, "gf", qf.device)
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1] or qf.shape[1] == 0:
        raise ValueError(
            "rank_metrics_from_features: qf and gf must be 2-D [num, dim] with the same dim >= 1, "
            f"got {tuple(qf.shape)} and {tuple(gf.shape)}"
        )
    for name, f in (("qf", qf), ("gf", gf)):
        finite = torch.isfinite(f).all(1) if f.dtype.is_floating_point else None
        if finite is not None and not bool(finite.all()):
            row = int((~finite).nonzero()[0, 0])
            kind = "NaN" if bool(f[row].isnan().any()) else "infinite"
            raise ValueError(f"rank_metrics_from_features: {name} holds {kind} values (row {row} "
                             f"of {f.shape[0]}); features must be finite")
    dtype = torch.promote_types(qf.dtype, gf.dtype)
    if not dtype.is_floating_point or dtype in (torch.float16, torch.bfloat16):
        # On every device: in bfloat16 the 2048-d squared distances collapse into ties, in
        # float16 they overflow to inf/NaN (and half GEMMs are slow on CPU).
        dtype = torch.float32
    qf, gf = qf.to(dtype).contiguous(), gf.to(dtype).contiguous()
    if metric == "cosine":
        qf, gf = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
        return qf, gf, None, None
    return qf, gf, (qf * qf).sum(1), (gf * gf).sum(1)


def _distance_tile(qf, gf, qn, gn, out=None):
    """The distance formula of the features path, for one tile (and for pairwise_distance).

    euclidean: ``|q|^2 + |g|^2 - 2 q.g`` (squared, as torchreid's ``euclidean_squared_distance``);
    cosine: ``1 - q.g`` on L2-normalised features. The product is taken in full float32 even
    where the process allows TF32 / bfloat16 float32 GEMMs (``torch.set_float32_matmul_precision``):
    the difference of large terms amplifies their error, and the positives (computed
    elementwise in float32) would be ranked against reduced-precision negatives.
    """
    if qf.dtype == torch.float32 and _fp32_matmul_reduced(qf.device):
        full = distance_gemm(qf, gf)
        out = full if out is None else out.copy_(full)
    else:
        out = torch.matmul(qf, gf.t(), out=out)
    if qn is None:
        return out.neg_().add_(1.0)
    return out.mul_(-2.0).add_(qn[:, None]).add_(gn[None, :])


def _fp32_matmul_reduced(device: torch.device) -> bool:
    """Whether float32 GEMMs on ``device`` may run in TF32 / bfloat16 (read through the new
    ``fp32_precision`` API, which also reflects the legacy ``allow_tf32`` flag)."""
    backend = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
    return backend.fp32_precision in ("tf32", "bf16")


def _pair_distance(qf, gf, qn, gn):
    """The same formula for given (query, gallery) pairs (the positives), row by row."""
    dot = (qf * gf).sum(1)
    if qn is None:
        return 1.0 - dot
    return qn + gn - 2.0 * dot


def pairwise_distance(qf: Any, gf: Any, metric: str = "euclidean") -> torch.Tensor:
    """The full ``[Q, G]`` matrix that :func:`rank_metrics_from_features` ranks on, tile formula
    and all (for users who want the matrix, and for tests)."""
    qf, gf, qn, gn = _prepare_features(qf, gf, metric)
    return _distance_tile(qf, gf, qn, gn)


def rank_metrics_from_features(
    qf: Any,
    gf: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    metric: str = "euclidean",
    max_rank: int = 50,
    chunk: int = 4096,
    query_chunk: int = 1024,
    group: Any = None,
    g_offset: int | None = None,
) -> RankMetrics:
    """:func:`rank_metrics` from ``[Q, D]`` query and ``[G, D]`` gallery features.

    The distances are computed one ``query_chunk x chunk`` tile at a time (one GEMM per tile)
    and consumed by the counting op while the tile is hot in cache: the whole ``Q x G`` matrix
    never exists. Tiles of 1024 queries keep the number of GEMM calls, and so the repacking of
    the gallery features by the BLAS, low (256-query tiles cost ~15% over one whole-matrix
    GEMM on a Market-1501-sized problem, 1024-query tiles ~1%); tiles of 4096 gallery columns
    halve the per-tile work of the counting op against 1024 columns for 128-d features. Peak
    extra memory is one tile (``query_chunk * chunk`` values; 16 MiB in float32 with the
    defaults) plus
    O(Q + G + number of positives) -- an MSMT17-sized problem (11,659 x 82,161, 2048-d) needs
    little beyond the features themselves.

    Distances: ``metric="euclidean"`` is the squared euclidean distance
    ``|q|^2 + |g|^2 - 2 q.g`` (torchreid's default); ``"cosine"`` is ``1 - cos``. Ranks are taken
    on the distances computed here, in float64 for float64 features and in full float32 otherwise
(half features are promoted on every device; TF32 / bfloat16 GEMM settings are overridden).
    The positives' distances are computed pair by pair with the same formula (never read from
    a tile), so they can differ from the matrix entries of :func:`pairwise_distance` by float
    rounding; the result equals :func:`rank_metrics` on that matrix whenever the arithmetic is
    exact, and otherwise can differ only for a positive within rounding of a negative.

    ``group``/``g_offset``: as in :func:`rank_metrics`, with ``gf``/``g_pids``/``g_camids`` this
    process's gallery shard.
    """
    if chunk < 1 or query_chunk < 1:
        raise ValueError(f"rank_metrics_from_features: chunk and query_chunk must be >= 1, got {chunk}, {query_chunk}")
    if max_rank < 1:
        raise ValueError(f"rank_metrics_from_features: max_rank must be >= 1, got {max_rank}")
    qf, gf, qn, gn = _prepare_features(qf, gf, metric)
    dev = qf.device
    num_q, num_local = qf.shape[0], gf.shape[0]
    ids = _ids(q_pids, g_pids, q_camids, g_camids, num_q, num_local, dev, group, g_offset,
               "qf", "gf row")
    qi, gl = _positives(ids)
    qi_t, gl_t = torch.from_numpy(qi).to(dev), torch.from_numpy(gl).to(dev)
    pd = _pair_distance(qf[qi_t], gf[gl_t], None if qn is None else qn[qi_t],
                        None if gn is None else gn[gl_t])
    pos = _positive_set(ids, qi, gl, pd, group)

    counts = torch.zeros_like(pos.gidx)
    offs = pos.offsets
    buf = torch.empty(min(query_chunk, num_q) * min(chunk, num_local), dtype=qf.dtype, device=dev)
    for q0 in range(0, num_q, query_chunk):
        q1 = min(q0 + query_chunk, num_q)
        p0, p1 = int(offs[q0]), int(offs[q1])
        if p1 == p0:
            continue  # no query of this block has a positive
        q_off = pos.offsets_dev[q0 : q1 + 1] - p0
        qn_b = None if qn is None else qn[q0:q1]
        part = counts[p0:p1]
        for g0 in range(0, num_local, chunk):
            g1 = min(g0 + chunk, num_local)
            t = buf[: (q1 - q0) * (g1 - g0)].view(q1 - q0, g1 - g0)
            _distance_tile(qf[q0:q1], gf[g0:g1], qn_b, None if gn is None else gn[g0:g1], out=t)
            part += rank_count_preceding(
                t, ids.q_pids_dev[q0:q1], ids.g_pids_dev[g0:g1], q_off, pos.dist[p0:p1],
                pos.gidx[p0:p1], ids.g_offset + g0,
            )
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, group=group)
    return _finalize(counts, pos, ids.num_g, max_rank)
