"""Re-ranked distances streamed into the ranking one block of query rows at a time: the same
metrics as ranking the whole re-ranked matrix (market and CUHK03 protocols), and one ``Q x G``
buffer in all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edaan_fast.metrics.features import Features, ReRanking, distance_matrix, evaluate_features
from edaan_fast.metrics.protocols import cuhk03_single_gallery_shot, market_duke
from edaan_fast.metrics.reranking import re_ranking_features, re_ranking_features_rows
from edaan_fast.ops import RowBlocks, rank_metrics, rank_metrics_from_row_blocks
from tests.conftest import requires_ops

pytestmark = requires_ops


def _problem(seed, num_q=23, num_g=90, dim=6, ties=True, ids=7, cams=3):
    g = torch.Generator().manual_seed(seed)
    qf = torch.randn(num_q, dim, generator=g, dtype=torch.float64)
    gf = torch.randn(num_g, dim, generator=g, dtype=torch.float64)
    if ties:  # integer points: exactly equal distances, duplicated items
        qf, gf = qf.round(), gf.round()
    q_pids = torch.randint(0, ids, (num_q,), generator=g)
    g_pids = torch.randint(0, ids, (num_g,), generator=g)
    q_cams = torch.randint(0, cams, (num_q,), generator=g)
    g_cams = torch.randint(0, cams, (num_g,), generator=g)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def _same(a, b):
    assert np.array_equal(a.cmc, b.cmc)  # bit-identical CMC
    assert abs(a.mAP - b.mAP) <= 1e-12 and abs(a.mINP - b.mINP) <= 1e-12


@pytest.mark.parametrize("ties", [True, False], ids=["ties", "random"])
@pytest.mark.parametrize("block", [1, 4, 7, 1000])
def test_blocks_equal_the_rows_of_the_whole_matrix(ties, block):
    qf, gf, *_ = _problem(0, ties=ties)
    whole = re_ranking_features(qf, gf, k1=6, k2=3)
    rows = re_ranking_features_rows(qf, gf, k1=6, k2=3, query_block=block)
    seen = 0
    for q0, b in rows:
        assert q0 == seen and b.shape[0] == min(block, qf.shape[0] - q0)
        assert torch.equal(b, whole[q0 : q0 + b.shape[0]])
        seen += b.shape[0]
    assert seen == qf.shape[0]


def test_float32_blocks_equal_the_float32_matrix():
    qf, gf, *_ = _problem(1, ties=False)
    whole = re_ranking_features(qf.float(), gf.float())
    got = torch.cat([b for _, b in re_ranking_features_rows(qf.float(), gf.float(),
                                                            query_block=5)])
    assert got.dtype == torch.float32 and torch.equal(got, whole)


@pytest.mark.parametrize("ties", [True, False], ids=["ties", "random"])
def test_streamed_market_metrics_equal_the_whole_matrix(ties):
    qf, gf, *ids = _problem(2, ties=ties)
    want = rank_metrics(re_ranking_features(qf, gf), *ids)
    got = rank_metrics_from_row_blocks(re_ranking_features_rows(qf, gf, query_block=4), *ids)
    _same(got, want)
    assert np.array_equal(got.ap_per_query, want.ap_per_query, equal_nan=True)
    assert np.array_equal(got.valid, want.valid)
    # the protocol entry takes the blocks too
    _same(market_duke(re_ranking_features_rows(qf, gf, query_block=6), *ids),
          market_duke(re_ranking_features(qf, gf), *ids))


@pytest.mark.parametrize("chunk_elems", [1, 200, 1 << 22])
def test_streamed_cuhk03_repeats_equal_the_whole_matrix(chunk_elems):
    qf, gf, *ids = _problem(3, num_q=30, num_g=120)
    want = cuhk03_single_gallery_shot(re_ranking_features(qf, gf), *ids, repeats=4, seed=5,
                                      chunk_elems=chunk_elems)
    got = cuhk03_single_gallery_shot(re_ranking_features_rows(qf, gf, query_block=7), *ids,
                                     repeats=4, seed=5, chunk_elems=chunk_elems)
    _same(got, want)
    assert got.num_valid == want.num_valid


@pytest.mark.parametrize("protocol", ["market", "cuhk03"])
def test_evaluate_features_streams_and_agrees_with_the_matrix(protocol):
    qf, gf, qp, gp, qc, gc = _problem(4, num_q=40, num_g=150)
    q, g = Features(qf.float(), qp, qc), Features(gf.float(), gp, gc)
    rr = ReRanking(k1=5, k2=2, lambda_value=0.2)
    got = evaluate_features(q, g, protocol, rerank=rr, repeats=3)
    want = evaluate_features(q, g, protocol, rerank=rr, repeats=3,
                             distmat=distance_matrix(q, g, "euclidean", rr))
    _same(got, want)


class _FreshTensors(TorchDispatchMode):
    """The element count of every tensor an op allocates (outputs without an alias annotation:
    views and in-place results are not allocations)."""

    def __init__(self):
        super().__init__()
        self.allocs: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, t in zip(func._schema.returns, outs):
            if ret.alias_info is not None:
                continue
            for x in (t if isinstance(t, (tuple, list)) else (t,)):
                if isinstance(x, torch.Tensor):
                    self.allocs.append((str(func), x.numel()))
        return out


@pytest.mark.parametrize("protocol", ["market", "cuhk03"])
def test_streamed_evaluation_allocates_one_q_by_g_buffer(protocol):
    """The bound of the streamed path: the [Q, G] buffer of M[q, Q:] (re-ranked in place) is the
    only allocation of Q x G / 2 elements or more; everything else is a block of query rows
    (query_block x G) or O((Q + G) k). Allocations inside the C++ kernels (per-thread rows of G
    or N values) are not seen by the dispatcher and are no larger."""
    num_q, num_g, block = 100, 1000, 10
    qf, gf, *ids = _problem(5, num_q=num_q, num_g=num_g, dim=8, ties=False, ids=40)
    qf, gf = qf.float(), gf.float()
    with _FreshTensors() as seen:
        rows = re_ranking_features_rows(qf, gf, k1=5, k2=3, query_block=block)
        if protocol == "market":
            res = market_duke(rows, *ids)
        else:
            res = cuhk03_single_gallery_shot(rows, *ids, repeats=2, chunk_elems=1 << 22)
    large = [(op, n) for op, n in seen.allocs if n >= num_q * num_g // 2]
    assert len(large) == 1 and large[0][1] == num_q * num_g, large
    assert max(n for op, n in seen.allocs if (op, n) != large[0]) <= 2 * block * num_g
    assert res.num_valid > 0


def test_blocks_are_single_use_and_checked():
    qf, gf, *_ = _problem(6)
    rows = re_ranking_features_rows(qf, gf, query_block=5)
    list(rows)
    with pytest.raises(RuntimeError, match="already produced once"):
        list(rows)
    with pytest.raises(ValueError, match="query_block must be >= 1"):
        re_ranking_features_rows(qf, gf, query_block=0)
    with pytest.raises(ValueError, match="k2 must be an integer"):
        re_ranking_features_rows(qf, gf, k2=0)
    d = torch.rand(4, 9, dtype=torch.float64)
    skipping = RowBlocks((4, 9), d.device, lambda: iter([(0, d[:2]), (3, d[3:])]))
    with pytest.raises(ValueError, match="expected the block of queries from 2"):
        list(skipping)
    short = RowBlocks((4, 9), d.device, lambda: iter([(0, d[:2])]))
    with pytest.raises(ValueError, match="ended at query 2 of 4"):
        list(short)
