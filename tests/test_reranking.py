"""k-reciprocal re-ranking: the fused pipeline against the per-probe float64 reference, and each
fused step against its pure-PyTorch twin (edaan_fast/ops/reference.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from edaan_fast.metrics.reranking import _reference_re_ranking, re_ranking, re_ranking_features
from edaan_fast.ops import reference
from edaan_fast.ops import reranking as ops
from tests.conftest import DEVICES, requires_cuda, requires_ops

pytestmark = requires_ops


def _blocks(seed, num_q=15, num_g=40, dim=4, ties=False):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(num_q + num_g, dim))
    if ties:
        f = np.round(f)  # integer points: many exactly equal distances (and duplicates)
    d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
    return f, d[:num_q, num_q:], d[:num_q, :num_q], d[num_q:, num_q:]


# --- the whole re-ranking against the per-probe reference ------------------------------------


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (5, 3, 0.3), (4, 1, 0.5), (7, 10, 0.0)])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device, k1, k2, lam, ties):
    _, qg, qq, gg = _blocks(0, ties=ties)
    ref = _reference_re_ranking(qg, qq, gg, k1, k2, lam)
    out = re_ranking(*(torch.tensor(a, device=device) for a in (qg, qq, gg)), k1, k2, lam)
    assert out.shape == (15, 40) and out.dtype == torch.float64 and out.device.type == device
    torch.testing.assert_close(out.cpu(), torch.from_numpy(ref), atol=1e-10, rtol=0)


@pytest.mark.parametrize("ties", [False, True], ids=["clustered", "ties"])
def test_matches_reference_default_parameters_larger(ties):
    """N = 300 with the paper's k1 = 20, k2 = 6: the expansion sets and the query expansion are
    non-trivial, and (with integer features) thousands of exactly tied distances."""
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(30, 6)) * 2
    f = centres[rng.integers(0, 30, 300)] + rng.normal(size=(300, 6))
    if ties:
        f = np.round(f)
    d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
    qg, qq, gg = d[:60, 60:], d[:60, :60], d[60:, 60:]
    ref = _reference_re_ranking(qg, qq, gg)
    out = re_ranking(qg, qq, gg, row_chunk=37)
    assert float((out - torch.from_numpy(ref)).abs().max()) <= 1e-9


def test_chunking_does_not_change_the_result():
    _, qg, qq, gg = _blocks(1, ties=True)
    a = re_ranking(qg, qq, gg)
    b = re_ranking(qg, qq, gg, row_chunk=1, pair_budget=1)
    c = re_ranking(qg, qq, gg, row_chunk=6, pair_budget=37)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_problem_smaller_than_k():
    _, qg, qq, gg = _blocks(2, num_q=3, num_g=5)
    out = re_ranking(qg, qq, gg, k1=20, k2=6)
    torch.testing.assert_close(
        out, torch.from_numpy(_reference_re_ranking(qg, qq, gg)), atol=1e-10, rtol=0
    )


def test_single_query_and_single_gallery_item():
    _, qg, qq, gg = _blocks(12, num_q=1, num_g=1)
    out = re_ranking(qg, qq, gg, k1=3, k2=2)
    ref = _reference_re_ranking(qg, qq, gg, k1=3, k2=2)
    torch.testing.assert_close(out, torch.from_numpy(ref), atol=1e-12, rtol=0)
    assert re_ranking(np.zeros((0, 4)), np.zeros((0, 0)), np.eye(4)).shape == (0, 4)


def test_asymmetric_blocks():
    """The authors normalise columns then transpose: exact for non-symmetric q_q/g_g too."""
    rng = np.random.default_rng(3)
    qg, qq, gg = rng.random((6, 20)), rng.random((6, 6)), rng.random((20, 20))
    ref = _reference_re_ranking(qg, qq, gg, k1=5, k2=3)
    torch.testing.assert_close(
        re_ranking(qg, qq, gg, k1=5, k2=3), torch.from_numpy(ref), atol=1e-10, rtol=0
    )


def test_lambda_one_is_the_normalised_original_distance():
    _, qg, qq, gg = _blocks(4)
    stacked = np.block([[qq, qg], [qg.T, gg]]) ** 2
    expected = (stacked / stacked.max(axis=0)).T[:15, 15:]
    torch.testing.assert_close(re_ranking(qg, qq, gg, lambda_value=1.0), torch.from_numpy(expected))


def test_float32_input_close_to_float64_reference():
    _, qg, qq, gg = _blocks(5, dim=8)
    out = re_ranking(*(torch.tensor(a, dtype=torch.float32) for a in (qg, qq, gg)))
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out.double(), torch.from_numpy(_reference_re_ranking(qg, qq, gg)), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_features_entry_equals_distance_entry(metric):
    f, *_ = _blocks(6, dim=6)
    ft = torch.tensor(f)
    if metric == "euclidean":
        d = torch.cdist(ft, ft)
    else:
        n = torch.nn.functional.normalize(ft, dim=1)
        d = 1 - n @ n.t()
    out = re_ranking_features(ft[:15], ft[15:], metric=metric, row_chunk=8)
    ref = _reference_re_ranking(d[:15, 15:].numpy(), d[:15, :15].numpy(), d[15:, 15:].numpy())
    torch.testing.assert_close(out, torch.from_numpy(ref), atol=1e-6, rtol=0)


def test_reranking_helps_on_clustered_data():
    """Identities as tight clusters with a few outlier views: re-ranking raises mAP."""
    from edaan_fast.metrics.protocols import market_duke

    rng = np.random.default_rng(7)
    ids, per = 12, 6
    centres = rng.normal(size=(ids, 16)) * 1.5
    pids = np.repeat(np.arange(ids), per)
    f = centres[pids] + rng.normal(size=(ids * per, 16))
    cams = np.tile(np.arange(per), ids)
    q = cams == 0
    qf, gf = torch.tensor(f[q]), torch.tensor(f[~q])
    before = market_duke(torch.cdist(qf, gf), pids[q], pids[~q], cams[q], cams[~q])
    after = market_duke(
        re_ranking_features(qf, gf, k1=6, k2=3), pids[q], pids[~q], cams[q], cams[~q]
    )
    assert after.mAP > before.mAP + 0.02


# --- input checks of the public functions ------------------------------------------------------


def _nan_at(a, i, j):
    b = a.copy()
    b[i, j] = np.nan
    return b


_QG, _QQ, _GG = _blocks(8)[1:]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: re_ranking(_QG, _QQ[:, :3], _GG), r"re_ranking: expected q_q_dist \[15, 15\]"),
        (lambda: re_ranking(_QG, _QQ, _GG[1:]), r"g_g_dist \[40, 40\] .* got \(15, 15\) and \(39, 40\)"),
        (lambda: re_ranking(_QG[0], _QQ, _GG), "re_ranking: q_g_dist must be 2-D"),
        (lambda: re_ranking(_QG, _QQ, _GG, k1=0), "re_ranking: k1 must be an integer >= 1, got 0"),
        (lambda: re_ranking(_QG, _QQ, _GG, k2=0), r"re_ranking: k2 must be an integer in \[1, N = Q \+ G = 55\], got 0"),
        (lambda: re_ranking(_QG, _QQ, _GG, k2=56), r"k2 must be an integer in \[1, N = Q \+ G = 55\], got 56"),
        (lambda: re_ranking(_QG, _QQ, _GG, lambda_value=1.5), r"lambda_value must be in \[0, 1\], got 1.5"),
        (lambda: re_ranking(_QG, _QQ, _GG, lambda_value=-0.1), r"lambda_value must be in \[0, 1\], got -0.1"),
        (lambda: re_ranking(_QG, _QQ, _GG, lambda_value=float("nan")), r"lambda_value must be in \[0, 1\], got nan"),
        (lambda: re_ranking(_nan_at(_QG, 2, 3), _QQ, _GG), "re_ranking: q_g_dist must be finite, got NaN or inf among the distances of query 2"),
        (lambda: re_ranking(_QG, _nan_at(_QQ, 4, 1), _GG), "re_ranking: q_q_dist must be finite, got NaN or inf among the distances of query 1"),
        (lambda: re_ranking(_QG, _QQ, _nan_at(_GG, 5, 6)), "re_ranking: g_g_dist must be finite, got NaN or inf among the distances of gallery item 6"),
        (lambda: re_ranking_features(np.ones((2, 3)), np.ones((4, 3)), metric="l1"), "unknown metric 'l1'"),
        (lambda: re_ranking_features(np.ones((2, 3)), np.ones((4, 5))), "qf and gf dims differ"),
        (lambda: re_ranking_features(_nan_at(np.ones((2, 3)), 1, 1), np.ones((4, 3))), "re_ranking_features: qf must be finite"),
        (lambda: re_ranking_features(np.ones((2, 3)), _nan_at(np.ones((4, 3)), 0, 2)), "re_ranking_features: gf must be finite"),
    ],
    ids=lambda x: "" if callable(x) else x[:40],
)
def test_input_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- memory: O(N k) plus one tile -------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import torch
    from edaan_fast.metrics.reranking import re_ranking_features

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    n, num_q, dim = {n}, {num_q}, 16
    centres = torch.randn(n // 10, dim, generator=g)
    f = centres[torch.randint(0, n // 10, (n,), generator=g)] + torch.randn(n, dim, generator=g)
    re_ranking_features(f[:50], f[50:400])  # load the library, warm the allocator
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS
    before = status("VmRSS")
    out = re_ranking_features(f[:num_q], f[num_q:])
    peak = status("VmHWM")
    assert out.shape == (num_q, n - num_q) and bool(torch.isfinite(out).all())
    print(peak - before)
    """
)


def test_memory_is_linear_in_n_plus_one_tile():
    """N = 25,000 (16-d): a dense N x N float32 matrix is 2.5 GB; the re-ranking must stay
    under 256 MiB above what the process held before (the [Q, G] output is 30 MB, the default
    score tile 64 MB; measured: ~110 MiB)."""
    n, num_q, limit = 25_000, 300, 256 << 20
    assert 4 * n * n > 9 * limit
    script = _MEMORY_SCRIPT.format(n=n, num_q=num_q)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    extra = int(res.stdout.strip().splitlines()[-1])
    assert extra < limit, f"peak RSS grew by {extra / 2**20:.0f} MiB"


# --- the fused steps against their twins -------------------------------------------------------


def _scores(seed, rows, n, dim=5, ties=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, dim, generator=g, dtype=torch.float64)
    if ties:
        f = f.round()
    return f.to(dtype), f[:rows].to(dtype) @ f.to(dtype).t()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", ["distance", "euclidean", "cosine"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_knn_lists_matches_reference(device, dtype, metric, ties):
    f, dots = _scores(1, 23, 97, ties=ties, dtype=dtype)
    sq = (f * f).sum(1)
    if metric == "distance":
        scores, row_sq, col_sq = torch.cdist(f[:23], f), None, None
    elif metric == "euclidean":
        scores, row_sq, col_sq = dots, sq[:23], sq
    else:
        u = torch.nn.functional.normalize(f, dim=1)
        scores, row_sq, col_sq = u[:23] @ u.t(), None, None
    scores = scores[:, :-1] if ties else scores  # also an N that is not a multiple of 16
    col_sq = col_sq[:-1] if (ties and col_sq is not None) else col_sq
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    kept = torch.full((23, 30), -1.0, dtype=dtype, device=device)
    nn, nd, sc = ops.knn_lists(dev(scores), 21, metric, dev(row_sq), dev(col_sq), kept)
    r_kept = torch.empty(23, 30, dtype=dtype)
    r_nn, r_nd, r_sc = reference.knn_lists(scores, 21, metric, row_sq, col_sq, r_kept)
    assert torch.equal(nn.cpu(), r_nn)
    torch.testing.assert_close(nd.cpu(), r_nd, atol=0, rtol=0)
    torch.testing.assert_close(sc.cpu(), r_sc, atol=0, rtol=0)
    torch.testing.assert_close(kept.cpu(), r_kept, atol=0, rtol=0)


def test_knn_lists_strided_rows_and_nan():
    _, scores = _scores(2, 10, 40)
    big = torch.zeros(10, 60, dtype=torch.float64)
    big[:, :40] = scores.abs()
    tile = big[:, :40]  # row stride 60
    nn, nd, sc = ops.knn_lists(tile, 7)
    r_nn, r_nd, r_sc = reference.knn_lists(tile, 7)
    assert torch.equal(nn, r_nn) and torch.equal(nd, r_nd) and torch.equal(sc, r_sc)
    tile[3, 5] = float("nan")
    _, _, sc = ops.knn_lists(tile, 7)
    assert bool(sc[3].isnan()) and bool(torch.isfinite(sc[torch.arange(10) != 3]).all())


def _neighbour_table(seed, n=80, k=21, ties=True):
    f, _ = _scores(seed, n, n, dim=3, ties=ties)
    nn, nd, _ = ops.knn_lists(torch.cdist(f, f), k)
    return nn, nd


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k1", [20, 7, 5, 1])
def test_k_reciprocal_sets_matches_reference(device, k1):
    nn, nd = _neighbour_table(3)
    ptr, col, dist = ops.k_reciprocal_sets(nn.to(device), nd.to(device), k1, 9, 71)
    r_ptr, r_col, r_dist = reference.k_reciprocal_sets(nn, nd, k1, 9, 71)
    assert torch.equal(ptr.cpu(), r_ptr) and torch.equal(col.cpu(), r_col)
    torch.testing.assert_close(dist.cpu(), r_dist, atol=0, rtol=0, equal_nan=True)
    if k1 == 20:
        assert bool(dist.isnan().any())  # some members came in by expansion only


def _csr_v(seed, n=80, dtype=torch.float64):
    nn, nd = _neighbour_table(seed)
    ptr, col, _ = ops.k_reciprocal_sets(nn, nd, 20)
    g = torch.Generator().manual_seed(seed)
    val = torch.rand(col.numel(), generator=g, dtype=torch.float64).to(dtype) + 0.1
    return nn, ptr, col, val


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k2", [6, 2, 1])
def test_query_expansion_matches_reference(device, dtype, k2):
    nn, ptr, col, val = _csr_v(4, dtype=dtype)
    out = ops.query_expansion(*(t.to(device) for t in (ptr, col, val, nn)), k2, 5, 61)
    ref = reference.query_expansion(ptr, col, val, nn, k2, 5, 61)
    assert torch.equal(out[0].cpu(), ref[0]) and torch.equal(out[1].cpu(), ref[1])
    torch.testing.assert_close(out[2].cpu(), ref[2], atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lam", [0.3, 0.0, 1.0])
def test_jaccard_rerank_matches_reference(device, dtype, lam):
    nn, ptr, col, val = _csr_v(5, dtype=dtype)
    q = tuple(t for t in _rows(ptr, col, val, 0, 17))
    g = tuple(t for t in _rows(ptr, col, val, 17, 80))
    base = torch.rand(17, 63, dtype=torch.float64).to(dtype)
    out = base.clone().to(device)
    ops.jaccard_rerank_(out, *(t.to(device) for t in q + g), 80, lam)
    ref = reference.jaccard_rerank_(base.clone(), *q, *g, 80, lam)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=0)
    assert not torch.equal(out.cpu(), base) or lam == 1.0


def _rows(ptr, col, val, a, b):
    lo, hi = int(ptr[a]), int(ptr[b])
    return ptr[a : b + 1] - lo, col[lo:hi], val[lo:hi]


def _op_inputs():
    nn, ptr, col, val = _csr_v(6)
    f, _ = _scores(7, 9, 40)
    sq = (f * f).sum(1)
    return nn, ptr, col, val, f, sq


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(dtype):
    nn, ptr, col, val, f, sq = _op_inputs()
    f, sq, val = f.to(dtype), sq.to(dtype), val.to(dtype)
    nd = torch.rand(nn.shape, dtype=dtype)
    scores = f[:9] @ f.t()
    kept = torch.zeros(9, 12, dtype=dtype)
    torch.library.opcheck(torch.ops.edaan_fast.knn_lists.default, (scores, sq[:9], sq, 5, "euclidean", kept))
    # k1 = 1: every member of R* is in the table, so no NaN (opcheck compares without equal_nan)
    torch.library.opcheck(torch.ops.edaan_fast.k_reciprocal_sets.default, (nn, nd, 1, 3, 50))
    torch.library.opcheck(torch.ops.edaan_fast.query_expansion.default, (ptr, col, val, nn, 6, 0, 80))
    q, g = _rows(ptr, col, val, 0, 10), _rows(ptr, col, val, 10, 80)
    dist = torch.rand(10, 70, dtype=dtype)
    torch.library.opcheck(torch.ops.edaan_fast.jaccard_rerank_.default, (dist, *q, *g, 80, 0.3))


def test_compile_fullgraph():
    _, _, _, _, f, sq = _op_inputs()
    scores = f[:9] @ f.t()

    def fn(scores, row_sq, col_sq):
        kept = torch.zeros(9, 12, dtype=scores.dtype)
        nn, nd, sc = torch.ops.edaan_fast.knn_lists(scores, row_sq, col_sq, 5, "euclidean", kept)
        return nn + 1, nd * 2, sc, kept

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(scores, sq[:9], sq), fn(scores, sq[:9], sq)):
        assert torch.equal(a, b)


def test_compile_inductor():
    """The default backend (inductor): knn_lists writing into a buffer the graph creates
    (``kept``, Tensor(a!)) and jaccard_rerank_ updating a graph input in place, next to
    inductor's own generated kernels."""
    nn, ptr, col, val, f, sq = _op_inputs()
    scores = f[:9] @ f.t()
    q, g = _rows(ptr, col, val, 0, 10), _rows(ptr, col, val, 10, 80)
    dist = torch.rand(10, 70, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def fn(scores, row_sq, col_sq, dist):
        kept = torch.zeros(9, 12, dtype=scores.dtype)
        nn, nd, sc = torch.ops.edaan_fast.knn_lists(scores, row_sq, col_sq, 5, "euclidean", kept)
        torch.ops.edaan_fast.jaccard_rerank_(dist, *q, *g, 80, 0.3)
        return nn + 1, nd * 2, sc, kept, dist * 1

    compiled = torch.compile(fn, fullgraph=True)
    d1, d2 = dist.clone(), dist.clone()
    got = compiled(scores, sq[:9], sq, d1)
    want = fn(scores, sq[:9], sq, d2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(d1, d2, rtol=0, atol=1e-12)  # the input was updated in place
    assert not torch.equal(d1, dist)


def _op_errors():
    nn, ptr, col, val, f, sq = _op_inputs()
    scores = f[:9] @ f.t()
    nd = torch.rand(nn.shape, dtype=torch.float64)
    kept = torch.zeros(9, 0, dtype=torch.float64)
    knn = torch.ops.edaan_fast.knn_lists
    kr = torch.ops.edaan_fast.k_reciprocal_sets
    qe = torch.ops.edaan_fast.query_expansion
    jr = torch.ops.edaan_fast.jaccard_rerank_
    q, g = _rows(ptr, col, val, 0, 10), _rows(ptr, col, val, 10, 80)
    dist = torch.rand(10, 70, dtype=torch.float64)
    bad_ptr = ptr.clone()
    bad_ptr[3] = bad_ptr[4] + 1
    bad_col = col.clone()
    bad_col[0] = 80
    return [
        (lambda: knn(scores[0], sq[:9], sq, 5, "euclidean", kept), "knn_lists: scores must be a 2-D"),
        (lambda: knn(scores.half(), sq[:9], sq, 5, "distance", kept.half()), "knn_lists: scores must be float32 or float64, got Half"),
        (lambda: knn(scores, sq[:9], sq, 41, "euclidean", kept), r"knn_lists: k must be in \[1, N = 40\] .*got 41"),
        (lambda: knn(scores, sq[:9], sq, 0, "euclidean", kept), r"knn_lists: k must be in \[1, N = 40\] .*got 0"),
        (lambda: knn(scores, sq[:9], sq, 5, "l2", kept), 'knn_lists: metric must be "distance", "euclidean" or "cosine", got "l2"'),
        (lambda: knn(scores, sq[:9], sq, 5, "euclidean", torch.zeros(8, 3, dtype=torch.float64)), r"knn_lists: kept must be Double \[9, K <= 40\]"),
        (lambda: knn(scores, sq[:9], sq, 5, "euclidean", torch.zeros(3, 9, dtype=torch.float64).t()), "knn_lists: kept must have contiguous rows"),
        (lambda: knn(scores, sq[:8], sq, 5, "euclidean", kept), r"knn_lists: row_sq must be Double \[9\]"),
        (lambda: knn(scores, sq[:9], sq[:30], 5, "euclidean", kept), r"knn_lists: col_sq must be Double \[40\]"),
        (lambda: kr(nn.int(), nd, 20, 0, 80), "k_reciprocal_sets: nn must be an int64 .N, k. neighbour table, got Int"),
        (lambda: kr(nn, nd[:, :5], 20, 0, 80), r"k_reciprocal_sets: nn_dist must be \[80, 21\] like nn"),
        (lambda: kr(nn, nd.half(), 20, 0, 80), "k_reciprocal_sets: nn_dist must be float32 or float64"),
        (lambda: kr(nn, nd, 0, 0, 80), "k_reciprocal_sets: k1 must be >= 1, got 0"),
        (lambda: kr(nn[:, :10], nd[:, :10], 20, 0, 80), r"k_reciprocal_sets: nn must hold at least min\(k1 \+ 1, N\) = 21 neighbours per row, got 10"),
        (lambda: kr(nn, nd, 20, 5, 81), r"k_reciprocal_sets: rows must satisfy 0 <= row_start <= row_end <= N = 80, got 5 .. 81"),
        (lambda: kr(nn + 1, nd, 20, 0, 80), r"k_reciprocal_sets: nn entries must be row indices in \[0, 80\), got 80"),
        (lambda: qe(ptr.int(), col, val, nn, 6, 0, 80), r"query_expansion: v_ptr must be int64 \[rows \+ 1\], got Int"),
        (lambda: qe(ptr, col.int(), val, nn, 6, 0, 80), "query_expansion: v indices must be int64 1-D, got Int"),
        (lambda: qe(ptr, col, val[:-1], nn, 6, 0, 80), r"query_expansion: v_val must be \[\d+\] like its indices"),
        (lambda: qe(ptr, col, val.half(), nn, 6, 0, 80), "query_expansion: v_val must be float32 or float64"),
        (lambda: qe(ptr[:-1], col, val, nn, 6, 0, 80), r"query_expansion: v_ptr must be \[N \+ 1\] = \[81\]"),
        (lambda: qe(ptr, col, val, nn, 22, 0, 80), r"query_expansion: k2 must be in \[1, 21\] .*got 22"),
        (lambda: qe(ptr, col, val, nn, 6, 0, 90), r"query_expansion: rows must satisfy 0 <= row_start <= row_end <= N = 80, got 0 .. 90"),
        (lambda: qe(bad_ptr, col, val, nn, 6, 0, 80), "query_expansion: v_ptr must be non-decreasing"),
        (lambda: qe(ptr, bad_col, val, nn, 6, 0, 80), r"query_expansion: v indices must be in \[0, 80\), got 80 at entry 0"),
        (lambda: jr(dist[0], *q, *g, 80, 0.3), "jaccard_rerank_: dist must be a 2-D"),
        (lambda: jr(dist.half(), *q, *g, 80, 0.3), "jaccard_rerank_: dist must be float32 or float64"),
        (lambda: jr(dist[:9], *q, *g, 80, 0.3), r"jaccard_rerank_: q_ptr must be \[10\] \(one row per dist row\)"),
        (lambda: jr(dist[:, :69], *q, *g, 80, 0.3), r"jaccard_rerank_: g_ptr must be \[70\] \(one row per dist column\)"),
        (lambda: jr(dist, *q[:2], q[2].float(), *g, 80, 0.3), "jaccard_rerank_: q_val and g_val must have the dtype of dist"),
        (lambda: jr(dist, *q, *g, 80, 1.5), r"jaccard_rerank_: lambda_value must be in \[0, 1\], got 1.5"),
        (lambda: jr(dist, *q, *g, -1, 0.3), "jaccard_rerank_: num_columns must be >= 0, got -1"),
        (lambda: jr(dist, *q, *g, 50, 0.3), r"jaccard_rerank_: (q|g) indices must be in \[0, 50\)"),
        (lambda: jr(dist, q[0] + 1, *q[1:], *g, 80, 0.3), r"jaccard_rerank_: q_ptr must run from 0 to \d+"),
    ]


_OP_ERRORS = _op_errors()


@pytest.mark.parametrize("case", range(len(_OP_ERRORS)), ids=[m[:50] for _, m in _OP_ERRORS])
def test_op_input_checks(case):
    call, match = _OP_ERRORS[case]
    with pytest.raises(RuntimeError, match=match):
        call()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu_larger(dtype):
    rng = np.random.default_rng(13)
    centres = rng.normal(size=(60, 16)) * 2
    f = torch.as_tensor(centres[rng.integers(0, 60, 1500)] + rng.normal(size=(1500, 16)))
    f = f.to(dtype)
    a = re_ranking_features(f[:300], f[300:], row_chunk=200)
    b = re_ranking_features(f[:300].cuda(), f[300:].cuda(), row_chunk=200)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(b.cpu(), a, atol=tol, rtol=0)


# --- distributed: every process computes its share ---------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, problem, results):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        qf, gf, qg, qq, gg = problem
        a = re_ranking(qg, qq, gg, k1=9, k2=4, row_chunk=13, group=dist.group.WORLD)
        b = re_ranking_features(qf, gf, row_chunk=13, group=dist.group.WORLD)
        results[rank] = (a, b)
    finally:
        dist.destroy_process_group()


def test_distributed_equals_single_process():
    import torch.multiprocessing as mp

    rng = np.random.default_rng(17)
    centres = rng.normal(size=(12, 5)) * 2
    f = torch.as_tensor(np.round(centres[rng.integers(0, 12, 131)] + rng.normal(size=(131, 5))))
    qf, gf = f[:29], f[29:]
    d = torch.cdist(f, f)
    qg, qq, gg = d[:29, 29:], d[:29, :29], d[29:, 29:]
    single_a = re_ranking(qg, qq, gg, k1=9, k2=4, row_chunk=13)
    single_b = re_ranking_features(qf, gf, row_chunk=13)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_dist_worker, args=(2, _free_port(), (qf, gf, qg, qq, gg), results), nprocs=2,
                 join=True)
    for rank in range(2):
        a, b = results[rank]
        assert torch.equal(a, single_a)
        torch.testing.assert_close(b, single_b, atol=1e-12, rtol=0)
