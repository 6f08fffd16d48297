"""Evaluation protocols of the paper (§IV-A, Tables I-IV) on top of the sort-free rank evaluator.

* :func:`market_duke` -- Market-1501 / DukeMTMC-reID single-query protocol: for each query the
  gallery items with its pid *and* camera are dropped; CMC, mAP and mINP over the queries that
  keep a positive (just :func:`edaan_fast.ops.rank_metrics`).
* :func:`cuhk03_single_gallery_shot` -- torchreid's ``eval_cuhk03`` semantics: after the same
  junk removal, one gallery image per identity is drawn at random for each query, the CMC is
  taken on that sampled gallery, averaged over ``repeats`` draws; AP (and mINP) are computed
  on the whole (junk-free) gallery, as torchreid does.
* :func:`prid2011` -- PRID2011 single-shot, cam_a -> cam_b and cam_b -> cam_a (queries: the 100
  test identities of one camera; gallery: the same identities in the other camera plus that
  camera's unmatched persons as distractors, see :func:`edaan_fast.data.prid2011`), each
  direction reported as in Table III, plus their mean.

Every protocol takes either a ``[Q, G]`` distance matrix (array, tensor or nested list), a
``(query_features, gallery_features)`` *tuple* (``metric`` then picks squared euclidean or
cosine distance), or a :class:`~edaan_fast.ops.evaluation.RowBlocks` (the matrix one block of
query rows at a time, each ranked as it comes: re-ranked distances are streamed so) as its first
argument, plus the ids, and returns a :class:`ProtocolResult`
(fractions in [0, 1]). :func:`format_table` prints results shaped like the paper's tables.

Ranking ties: a stable order on (distance, gallery index) everywhere (torchreid uses an
unstable ``argsort``, so it may order exactly equal distances differently).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edaan_fast.ops import pairwise_distance, rank_metrics, rank_metrics_from_features
from edaan_fast.ops.evaluation import (
    RowBlockRanker,
    RowBlocks,
    as_tensor,
    rank_metrics_from_row_blocks,
)

__all__ = [
    "ProtocolResult",
    "cuhk03_single_gallery_shot",
    "format_table",
    "market_duke",
    "mean_result",
    "prid2011",
]

REPORTED_RANKS = (1, 5, 10, 20)


@dataclass
class ProtocolResult:
    """One evaluation's scores, all fractions in [0, 1].

    Attributes:
        rank1, rank5, rank10, rank20: CMC at ranks 1/5/10/20 (the last CMC value when the
            curve is shorter).
        mAP: mean average precision; mINP: mean inverse negative penalty (None where a
            protocol does not define it).
        cmc: the whole CMC curve (float32 numpy), ``cmc[r]`` = hit rate within rank ``r + 1``.
        num_valid: queries evaluated (those with a positive after junk removal).
    """

    rank1: float
    rank5: float
    rank10: float
    rank20: float
    mAP: float
    mINP: float | None = None
    cmc: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32), repr=False)
    num_valid: int = 0

    @classmethod
    def from_cmc(
        cls, cmc: np.ndarray, mAP: float, mINP: float | None, num_valid: int
    ) -> ProtocolResult:
        cmc = np.asarray(cmc, dtype=np.float32)
        ranks = [float(cmc[min(r, len(cmc)) - 1]) for r in REPORTED_RANKS]
        return cls(
            *ranks,
            mAP=float(mAP),
            mINP=None if mINP is None else float(mINP),
            cmc=cmc,
            num_valid=int(num_valid),
        )

    def as_metrics(self) -> dict[str, float]:
        """``{"rank1", "rank5", "rank10", "mAP", "mINP"}`` (mINP NaN where undefined)."""
        return {
            "rank1": self.rank1,
            "rank5": self.rank5,
            "rank10": self.rank10,
            "mAP": self.mAP,
            "mINP": math.nan if self.mINP is None else self.mINP,
        }


def _distmat(x: Any, metric: str) -> torch.Tensor:
    """A distance matrix from ``x``: the matrix itself, or ``pairwise_distance(qf, gf)``."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(
                "protocols: features must be a (query_features, gallery_features) pair, "
                f"got {len(x)} items"
            )
        return pairwise_distance(x[0], x[1], metric=metric)
    return as_tensor(x, "distmat")


def _ids(x: Any, device: torch.device) -> torch.Tensor:
    return as_tensor(x, "ids").to(device=device, dtype=torch.int64).reshape(-1)


def market_duke(
    x: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    metric: str = "euclidean",
    max_rank: int = 50,
) -> ProtocolResult:
    """Market-1501 / DukeMTMC-reID single-query protocol.

    Args:
        x: ``[Q, G]`` distances, a ``(qf [Q, D], gf [G, D])`` tuple (then the distances are
            computed tile by tile and the ``Q x G`` matrix is never held), or a
            :class:`~edaan_fast.ops.evaluation.RowBlocks` (each block ranked as it comes).
        q_pids, q_camids: ``[Q]``; g_pids, g_camids: ``[G]`` integer ids.
        metric: ``"euclidean"`` (squared) or ``"cosine"``, for features.
        max_rank: CMC length (cut to the gallery size).
    """
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(
                "market_duke: features must be a (query_features, gallery_features) pair, "
                f"got {len(x)} items"
            )
        m = rank_metrics_from_features(
            x[0], x[1], q_pids, g_pids, q_camids, g_camids, metric=metric, max_rank=max_rank
        )
    elif isinstance(x, RowBlocks):
        m = rank_metrics_from_row_blocks(x, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)
    else:
        m = rank_metrics(x, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)
    return ProtocolResult.from_cmc(m.cmc, m.mAP, m.mINP, int(m.valid.sum()))


# --- CUHK03 single-gallery-shot ---------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_SM_ADD, _SM_M1, _SM_M2 = (
    _signed(0x9E3779B97F4A7C15),
    _signed(0xBF58476D1CE4E5B9),
    _signed(0x94D049BB133111EB),
)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts signed values arithmetically)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic): a counter-based hash."""
    z = z + _SM_ADD
    z = (z ^ _shr(z, 30)) * _SM_M1
    z = (z ^ _shr(z, 27)) * _SM_M2
    return z ^ _shr(z, 31)


def _sample_keys(
    seed: int, repeat: int, q_idx: torch.Tensor, g_idx: torch.Tensor, num_g: int
) -> torch.Tensor:
    """Random keys ``[len(q_idx), len(g_idx)]`` (non-negative int64) for draw ``repeat``.

    The key of (query, gallery item) depends only on (seed, repeat, query, item), never on the
    chunking or the device, so results are reproducible everywhere. The sampled image of an
    identity is its valid item with the largest key: a uniform choice.
    """
    dev = q_idx.device
    base = _splitmix64(
        torch.tensor([(seed * 1_000_003 + repeat) & ((1 << 62) - 1)], dtype=torch.int64)
    )
    base = base.to(dev)
    pair = q_idx[:, None] * num_g + g_idx[None, :]
    return _shr(_splitmix64(pair ^ base), 11)


def cuhk03_single_gallery_shot(
    x: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    repeats: int = 10,
    seed: int = 0,
    max_rank: int = 50,
    metric: str = "euclidean",
    chunk_elems: int = 1 << 22,
) -> ProtocolResult:
    """CUHK03 single-gallery-shot protocol (torchreid's ``eval_cuhk03``).

    For each query: drop the gallery items with its pid and camera; skip it when no positive
    remains; draw one gallery image per identity (each identity's images equally likely, drawn
    independently per query and per repeat); take the CMC on the drawn gallery (the rank of the
    drawn positive among the drawn images, a stable order on (distance, index)); average over
    ``repeats`` draws and the valid queries. AP and mINP come from the whole junk-free gallery,
    as torchreid computes AP. The CMC length is ``min(max_rank, number of gallery identities)``.

    Vectorised over queries (chunks of ``chunk_elems`` matrix entries); the only Python loops
    run over the repeats and the chunks. Draws use counter-based keys (:func:`_sample_keys`),
    deterministic given ``seed`` on any device.
    """
    if repeats < 1:
        raise ValueError(f"cuhk03_single_gallery_shot: repeats must be >= 1, got {repeats}")
    if isinstance(x, RowBlocks):
        return _cuhk03_row_blocks(x, q_pids, g_pids, q_camids, g_camids, repeats, seed,
                                  max_rank, chunk_elems)
    d = _distmat(x, metric)
    if d.dim() != 2:
        raise ValueError(
            f"cuhk03_single_gallery_shot: distmat must be 2-D, got shape {tuple(d.shape)}"
        )
    full = rank_metrics(d, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)
    draws = _SingleShotDraws(q_pids, g_pids, q_camids, g_camids, d.shape[1], d.device, repeats,
                             seed, max_rank, torch.as_tensor(full.valid, device=d.device))
    draws.add(0, d, chunk_elems)
    return ProtocolResult.from_cmc(draws.cmc(), full.mAP, full.mINP, int(full.valid.sum()))


def _cuhk03_row_blocks(blocks: RowBlocks, q_pids, g_pids, q_camids, g_camids, repeats, seed,
                       max_rank, chunk_elems) -> ProtocolResult:
    """:func:`cuhk03_single_gallery_shot` of a matrix that comes one block of query rows at a
    time: each block is ranked (AP, mINP) and drawn from (CMC) as it comes; every per-query
    quantity is the one the whole matrix gives, so the result is identical."""
    ranker = RowBlockRanker(q_pids, g_pids, q_camids, g_camids, blocks.shape, blocks.device,
                            max_rank)
    draws = _SingleShotDraws(q_pids, g_pids, q_camids, g_camids, blocks.shape[1], blocks.device,
                             repeats, seed, max_rank,
                             torch.from_numpy(ranker.valid).to(blocks.device))
    for q0, block in blocks:
        ranker.add(q0, block)
        draws.add(q0, block, chunk_elems)
    full = ranker.result()
    return ProtocolResult.from_cmc(draws.cmc(), full.mAP, full.mINP, int(full.valid.sum()))


class _SingleShotDraws:
    """The single-gallery-shot CMC hits of :func:`cuhk03_single_gallery_shot`, accumulated over
    blocks of query rows (integer counts: the sum does not depend on the blocks)."""

    def __init__(self, q_pids, g_pids, q_camids, g_camids, num_g, dev, repeats, seed, max_rank,
                 valid):
        self.qp, self.gp = _ids(q_pids, dev), _ids(g_pids, dev)
        self.qc, self.gc = _ids(q_camids, dev), _ids(g_camids, dev)
        uniq, self.g_grp = torch.unique(self.gp, return_inverse=True)
        self.num_ids = uniq.numel()
        self.length = min(max_rank, self.num_ids)
        self.valid = valid
        self.num_g, self.dev, self.repeats, self.seed = num_g, dev, repeats, seed
        self.g_idx = torch.arange(num_g, device=dev)
        self.hits = torch.zeros(self.length, dtype=torch.float64, device=dev)

    def add(self, q_first: int, d_rows: torch.Tensor, chunk_elems: int) -> None:
        """The hits of queries ``q_first .. q_first + len(d_rows) - 1`` (``d_rows``: their
        ``[rows, G]`` distances), in chunks of ``chunk_elems`` entries."""
        dev, num_g, num_ids, length = self.dev, self.num_g, self.num_ids, self.length
        g_idx, g_grp = self.g_idx, self.g_grp
        rows = max(1, chunk_elems // max(num_g, 1))
        num_rows = d_rows.shape[0]
        for r0 in range(0, num_rows, rows):
            r1 = min(r0 + rows, num_rows)
            q0, q1 = q_first + r0, q_first + r1
            vq = self.valid[q0:q1]
            if not bool(vq.any()):
                continue
            local = torch.arange(r0, r1, device=dev)[vq]
            q_idx = local + q_first
            dq = d_rows[local]
            same = self.qp[q_idx, None] == self.gp[None, :]
            keep = ~(same & (self.qc[q_idx, None] == self.gc[None, :]))
            grp = g_grp.expand(q_idx.numel(), num_g)
            for r in range(self.repeats):
                key = torch.where(keep, _sample_keys(self.seed, r, q_idx, g_idx, num_g), -1)
                best = torch.full((q_idx.numel(), num_ids), -1, dtype=torch.int64, device=dev)
                best.scatter_reduce_(1, grp, key, reduce="amax")
                chosen = keep & (key == best.gather(1, grp))
                # exact key collisions: keep the lowest index of the identity
                first = torch.full((q_idx.numel(), num_ids), num_g, dtype=torch.int64,
                                   device=dev)
                first.scatter_reduce_(1, grp, torch.where(chosen, g_idx, num_g), reduce="amin")
                chosen &= g_idx[None, :] == first.gather(1, grp)
                pos = chosen & same  # exactly one per valid query
                p_idx = pos.to(torch.int8).argmax(1)
                p_d = dq.gather(1, p_idx[:, None])
                before = (dq < p_d) | ((dq == p_d) & (g_idx[None, :] < p_idx[:, None]))
                rank = (chosen & ~same & before).sum(1)
                self.hits += torch.bincount(rank.clamp_max(length), minlength=length + 1)[
                    :length
                ].to(torch.float64)

    def cmc(self) -> np.ndarray:
        total = self.repeats * int(self.valid.sum())
        return (torch.cumsum(self.hits, 0) / total).cpu().numpy().astype(np.float32)


# --- PRID2011 ---------------------------------------------------------------------------------


def prid2011(
    x_a2b: Any,
    q_pids_a2b: Any,
    g_pids_a2b: Any,
    x_b2a: Any,
    q_pids_b2a: Any,
    g_pids_b2a: Any,
    metric: str = "euclidean",
    max_rank: int = 20,
) -> dict[str, ProtocolResult]:
    """PRID2011 single-shot, both directions (Table III's cam1/cam2 and cam2/cam1).

    Args:
        x_a2b: distances ``[Q_a, G_b]`` (or features pair) of cam_a queries against the cam_b
            gallery (test identities + cam_b's distractors), with their pids; likewise
            ``x_b2a`` for cam_b queries against cam_a. The two cameras are the two camera ids,
            so every same-pid gallery item is a positive.

    Returns:
        ``{"a2b": ..., "b2a": ..., "mean": ...}``: each direction and their mean
        (:func:`mean_result`: CMC, mAP and mINP averaged over the two directions).
    """
    out = {}
    for name, x, qp, gp in (
        ("a2b", x_a2b, q_pids_a2b, g_pids_a2b),
        ("b2a", x_b2a, q_pids_b2a, g_pids_b2a),
    ):
        qp = np.asarray(qp.cpu() if isinstance(qp, torch.Tensor) else qp).reshape(-1)
        gp = np.asarray(gp.cpu() if isinstance(gp, torch.Tensor) else gp).reshape(-1)
        out[name] = market_duke(
            x, qp, gp, np.zeros_like(qp), np.ones_like(gp), metric=metric, max_rank=max_rank
        )
    out["mean"] = mean_result([out["a2b"], out["b2a"]])
    return out


def mean_result(results: Sequence[ProtocolResult]) -> ProtocolResult:
    """The mean of several results (directions, random splits): CMC curves (cut to the shortest),
    mAP and mINP averaged with equal weights."""
    if not results:
        raise ValueError("mean_result: no results to average")
    n = min(len(r.cmc) for r in results)
    cmc = np.mean([r.cmc[:n] for r in results], axis=0).astype(np.float32)
    minp = (
        None if any(r.mINP is None for r in results) else float(np.mean([r.mINP for r in results]))
    )
    return ProtocolResult.from_cmc(
        cmc, float(np.mean([r.mAP for r in results])), minp, sum(r.num_valid for r in results)
    )


def format_table(
    results: Mapping[str, ProtocolResult], columns: Sequence[str] = ("R-1", "R-5", "R-10", "mAP")
) -> str:
    """A plain-text table shaped like the paper's Tables I-III: ``Method | R-1 | R-5 | R-10 |
    mAP`` in percent with one decimal. ``columns`` may also name ``R-20`` and ``mINP``."""
    getters = {
        "R-1": lambda r: r.rank1,
        "R-5": lambda r: r.rank5,
        "R-10": lambda r: r.rank10,
        "R-20": lambda r: r.rank20,
        "mAP": lambda r: r.mAP,
        "mINP": lambda r: r.mINP,
    }
    unknown = [c for c in columns if c not in getters]
    if unknown:
        raise ValueError(f"format_table: unknown columns {unknown}; choices: {list(getters)}")
    name_w = max([len("Method")] + [len(k) for k in results])
    col_w = max(5, *(len(c) for c in columns))
    head = f"{'Method':<{name_w}} | " + " | ".join(f"{c:>{col_w}}" for c in columns)
    rule = "-" * name_w + "-+-" + "-+-".join("-" * col_w for _ in columns)
    lines = [head, rule]
    for name, r in results.items():
        cells = []
        for c in columns:
            v = getters[c](r)
            cells.append(f"{'-':>{col_w}}" if v is None else f"{100.0 * v:>{col_w}.1f}")
        lines.append(f"{name:<{name_w}} | " + " | ".join(cells))
    return "\n".join(lines)
