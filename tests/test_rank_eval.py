"""Sort-free ranking evaluation (evaluate_rank / rank_metrics / rank_metrics_from_features)
against the textbook argsort evaluation in edaan_fast/ops/reference.py."""

from __future__ import annotations

import os
import socket
import warnings

import numpy as np
import pytest
import torch

from edaan_fast.ops import (
    RankMetrics,
    evaluate_rank,
    pairwise_distance,
    rank_metrics,
    rank_metrics_from_features,
    reference,
)
from edaan_fast.ops.rank_eval import NAN_FLAG

from tests.conftest import reduced_precision_float32_gemms, requires_cuda, requires_ops

pytestmark = requires_ops

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def make_problem(rng, num_q, num_g, num_ids, num_cams=3, levels=6, continuous=False):
    """Random ids/cameras and distances; integer distance levels give many exact ties, both
    among negatives and between positives and negatives."""
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(0, num_ids, num_g)
    q_cams = rng.integers(0, num_cams, num_q)
    g_cams = rng.integers(0, num_cams, num_g)
    if continuous:
        dist = rng.random((num_q, num_g))
    else:
        dist = rng.integers(0, levels, (num_q, num_g)).astype(np.float64)
    return dist, q_pids, g_pids, q_cams, g_cams


def assert_matches_reference(m: RankMetrics, dist64, q_pids, g_pids, q_cams, g_cams, max_rank):
    cmc, m_ap, m_inp, ap, valid = reference.rank_metrics(dist64, q_pids, g_pids, q_cams, g_cams, max_rank)
    assert m.cmc.dtype == np.float32 and m.cmc.shape == cmc.shape
    np.testing.assert_array_equal(m.cmc, cmc)  # bit-identical
    assert abs(m.mAP - m_ap) <= 1e-9
    assert abs(m.mINP - m_inp) <= 1e-9
    np.testing.assert_array_equal(m.valid, valid)
    np.testing.assert_allclose(m.ap_per_query[valid], ap[valid], rtol=0, atol=1e-12)
    assert np.isnan(m.ap_per_query[~valid]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_with_ties(device, dtype, seed):
    rng = np.random.default_rng(seed)
    dist, qp, gp, qc, gc = make_problem(rng, 40, 150, num_ids=12, levels=4 + seed)
    d = torch.as_tensor(dist).to(device, dtype)
    m = rank_metrics(d, qp, gp, qc, gc, max_rank=20)
    assert_matches_reference(m, d.double().cpu(), qp, gp, qc, gc, 20)


def test_matches_reference_continuous_float64():
    rng = np.random.default_rng(7)
    dist, qp, gp, qc, gc = make_problem(rng, 60, 300, num_ids=20, continuous=True)
    m = rank_metrics(dist, qp, gp, qc, gc)
    assert_matches_reference(m, dist, qp, gp, qc, gc, 50)


def test_many_exact_ties_float32():
    # a coarsely quantised float32 matrix: tens of thousands of exactly equal distances
    rng = np.random.default_rng(3)
    dist, qp, gp, qc, gc = make_problem(rng, 80, 2000, num_ids=40, num_cams=6, continuous=True)
    d32 = (np.round(dist * 16) / 16).astype(np.float32)
    m = rank_metrics(d32, qp, gp, qc, gc)
    assert_matches_reference(m, d32.astype(np.float64), qp, gp, qc, gc, 50)


def test_positive_tied_with_negatives_lower_index_first():
    # one query, positives at gallery 1 and 3 (camera 1), negatives tied with them
    dist = np.array([[0.5, 0.5, 0.5, 0.2, 0.5]])
    q_pids, g_pids = np.array([7]), np.array([1, 7, 2, 7, 3])
    q_cams, g_cams = np.array([0]), np.array([0, 1, 0, 1, 0])
    m = rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, max_rank=5)
    # stable order: g3 (0.2), g0, g1, g2, g4 -> positive ranks 0 and 2
    assert m.cmc.tolist() == [1.0] * 5
    assert m.mAP == pytest.approx((1 / 1 + 2 / 3) / 2, abs=1e-12)
    assert m.mINP == pytest.approx(2 / 3, abs=1e-12)


def test_junk_only_query_is_skipped():
    rng = np.random.default_rng(11)
    dist = rng.random((3, 6))
    q_pids, q_cams = np.array([1, 2, 3]), np.array([0, 0, 0])
    g_pids = np.array([1, 1, 2, 2, 9, 9])
    g_cams = np.array([1, 0, 0, 0, 1, 1])  # query 1 (pid 2): only same-camera items -> junk
    m = rank_metrics(dist, q_pids, g_pids, q_cams, g_cams)
    assert m.valid.tolist() == [True, False, False]
    assert_matches_reference(m, dist, q_pids, g_pids, q_cams, g_cams, 50)


def test_max_rank_larger_than_gallery_and_single_image_gallery():
    rng = np.random.default_rng(5)
    dist, qp, gp, qc, gc = make_problem(rng, 10, 7, num_ids=3)
    with pytest.warns(UserWarning, match="fewer than max_rank=50"):
        cmc, m_ap = evaluate_rank(dist, qp, gp, qc, gc, max_rank=50)
    assert cmc.shape == (7,)
    ref = reference.rank_metrics(dist, qp, gp, qc, gc, 50)
    np.testing.assert_array_equal(cmc, ref[0])
    assert abs(m_ap - ref[1]) <= 1e-9

    # one gallery image: seen from another camera by query 0, junk for query 1, no match for 2
    d1 = np.array([[0.3], [0.1], [0.2]])
    m = rank_metrics(d1, [4, 4, 5], [4], [0, 1, 0], [1], max_rank=10)
    assert m.cmc.tolist() == [1.0] and m.mAP == 1.0 and m.valid.tolist() == [True, False, False]


def test_evaluate_rank_is_a_drop_in(device):
    rng = np.random.default_rng(2)
    dist, qp, gp, qc, gc = make_problem(rng, 30, 120, num_ids=10)
    cmc, m_ap = evaluate_rank(
        torch.as_tensor(dist, device=device), torch.as_tensor(qp), torch.as_tensor(gp),
        torch.as_tensor(qc), torch.as_tensor(gc), max_rank=10, use_metric_cuhk03=False, use_cython=True,
    )
    assert isinstance(cmc, np.ndarray) and cmc.dtype == np.float32 and cmc.shape == (10,)
    assert isinstance(m_ap, float)
    ref = reference.rank_metrics(dist, qp, gp, qc, gc, 10)
    np.testing.assert_array_equal(cmc, ref[0])
    with pytest.raises(NotImplementedError, match="CUHK03"):
        evaluate_rank(dist, qp, gp, qc, gc, use_metric_cuhk03=True)


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="no query has a positive"):
        rank_metrics(np.zeros((2, 3)), [1, 2], [3, 4, 5], [0, 0], [1, 1, 1])


def test_bad_inputs_raise():
    dist = np.random.default_rng(0).random((4, 5))
    ids_q, ids_g = np.array([1, 2, 3, 4]), np.array([1, 2, 3, 4, 5])
    cq, cg = np.zeros(4, int), np.ones(5, int)
    with pytest.raises(ValueError, match="distmat must be 2-D"):
        rank_metrics(dist[0], ids_q[:1], ids_g, cq[:1], cg)
    with pytest.raises(ValueError, match=r"q_pids must be 1-D with 4 entries"):
        rank_metrics(dist, ids_q[:3], ids_g, cq, cg)
    with pytest.raises(ValueError, match=r"g_camids must be 1-D with 5 entries"):
        rank_metrics(dist, ids_q, ids_g, cq, cg[:4])
    with pytest.raises(ValueError, match="must hold integer ids"):
        rank_metrics(dist, ids_q.astype(float), ids_g, cq, cg)
    with pytest.raises(ValueError, match="max_rank must be >= 1"):
        rank_metrics(dist, ids_q, ids_g, cq, cg, max_rank=0)
    bad = dist.copy()
    bad[2, 4] = np.nan  # a negative's distance
    with pytest.raises(ValueError, match="distances of query 2 contain NaN"):
        rank_metrics(bad, ids_q, ids_g, cq, cg)
    bad = dist.copy()
    bad[1, 1] = np.nan  # the positive's own distance
    with pytest.raises(ValueError, match="distances of query 1 contain NaN"):
        rank_metrics(bad, ids_q, ids_g, cq, cg)
    with pytest.raises(ValueError, match="same dim"):
        rank_metrics_from_features(np.ones((4, 3)), np.ones((5, 2)), ids_q, ids_g, cq, cg)
    with pytest.raises(ValueError, match="unknown metric 'l1'"):
        rank_metrics_from_features(np.ones((4, 3)), np.ones((5, 3)), ids_q, ids_g, cq, cg, metric="l1")


@pytest.mark.parametrize("view", [
    "negative_strides", "transposed", "every_other_column", "big_endian", "float16",
    "longdouble", "uint16", "uint32", "uint64", "int8", "lists",
])
def test_evaluate_rank_accepts_every_array_numpy_accepts(view):
    rng = np.random.default_rng(5)
    dist, qp, gp, qc, gc = make_problem(rng, 12, 40, num_ids=5)  # integer levels: exact in all
    wide = np.repeat(dist, 2, axis=1)  # [12, 80]: every other column is dist
    gallery = (gp, gc)
    if view == "negative_strides":  # d[:, ::-1] with the gallery reversed to match
        d, gallery = dist[:, ::-1], (gp[::-1], gc[::-1])
        assert d.strides[1] < 0
    elif view == "transposed":
        d = np.asfortranarray(dist)
    elif view == "every_other_column":
        d = wide[:, ::2]
    elif view == "big_endian":
        d = dist.astype(">f8")
    elif view == "lists":
        d, gallery = dist.tolist(), (gp.tolist(), gc.tolist())
    else:
        d = dist.astype(view)
    ids = [np.ascontiguousarray(x) for x in (qp, *gallery, qc)]
    want_g = (np.ascontiguousarray(gallery[0]), np.ascontiguousarray(gallery[1]))
    cmc, m_ap = evaluate_rank(d, qp, gallery[0], qc, gallery[1], max_rank=10)
    ref_cmc, ref_ap = evaluate_rank(np.ascontiguousarray(np.asarray(d, dtype=np.float64)), ids[0],
                                    want_g[0], qc, want_g[1], max_rank=10)
    np.testing.assert_array_equal(cmc, ref_cmc)
    assert m_ap == ref_ap


def test_evaluate_rank_ids_of_other_dtypes_and_strides():
    rng = np.random.default_rng(6)
    dist, qp, gp, qc, gc = make_problem(rng, 12, 40, num_ids=5)
    ref = evaluate_rank(dist, qp, gp, qc, gc, max_rank=10)
    out = evaluate_rank(dist, qp.astype(np.uint32), np.repeat(gp, 2)[::2].astype(np.int16),
                        qc.astype(np.uint64), gc[::-1][::-1].astype(np.int8), max_rank=10)
    np.testing.assert_array_equal(out[0], ref[0])
    assert out[1] == ref[1]


def test_evaluate_rank_refuses_what_is_not_an_array_of_numbers():
    ids = np.arange(3)
    with pytest.raises(TypeError, match="distmat must be an array of numbers, got str of dtype <U"):
        evaluate_rank("distances", ids, ids, ids, ids)
    with pytest.raises(TypeError, match="distmat must be an array of numbers, got ndarray of "
                                        "dtype object"):
        evaluate_rank(np.array([[1.0, None]], dtype=object), ids[:1], ids[:2], ids[:1], ids[:2])
    with pytest.raises(TypeError, match="numpy cannot read as one"):
        evaluate_rank([[1.0, 2.0], [3.0]], ids[:2], ids[:2], ids[:2], ids[:2])


def test_features_must_be_finite_and_have_columns():
    rng = np.random.default_rng(7)
    qf, gf = rng.normal(size=(4, 3)), rng.normal(size=(5, 3))
    ids_q, ids_g, cq, cg = np.arange(4), np.arange(5), np.zeros(4, int), np.ones(5, int)
    with pytest.raises(ValueError, match=r"the same dim >= 1, got \(4, 0\) and \(5, 0\)"):
        rank_metrics_from_features(qf[:, :0], gf[:, :0], ids_q, ids_g, cq, cg)
    bad = gf.copy()
    bad[2, 1] = -np.inf
    with pytest.raises(ValueError, match=r"gf holds infinite values \(row 2 of 5\)"):
        rank_metrics_from_features(qf, bad, ids_q, ids_g, cq, cg)
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"gf holds NaN values \(row 2 of 5\)"):
        rank_metrics_from_features(qf, bad, ids_q, ids_g, cq, cg)
    with pytest.raises(ValueError, match=r"q_pids must be 1-D with 4 entries"):
        rank_metrics_from_features(qf, gf, ids_q.reshape(4, 1), ids_g, cq, cg)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_features_path_equals_distmat_path_exact_arithmetic(metric):
    # small-integer features: every distance formula is exact, so the tiles, the positives'
    # pairwise distances and the full matrix agree bit for bit (and tie a lot)
    rng = np.random.default_rng(1)
    qf = torch.as_tensor(rng.integers(-2, 3, (37, 6)), dtype=torch.float32)
    gf = torch.as_tensor(rng.integers(-2, 3, (211, 6)), dtype=torch.float32)
    if metric == "cosine":  # exact only for features of norm 1: one-hot rows, signed
        qf = torch.nn.functional.one_hot(torch.as_tensor(rng.integers(0, 6, 37)), 6).float()
        gf = torch.nn.functional.one_hot(torch.as_tensor(rng.integers(0, 6, 211)), 6).float()
        gf[::3] *= -1
    qp, gp = rng.integers(0, 9, 37), rng.integers(0, 9, 211)
    qc, gc = rng.integers(0, 3, 37), rng.integers(0, 3, 211)
    full = rank_metrics(pairwise_distance(qf, gf, metric), qp, gp, qc, gc)
    for chunk, query_chunk in [(1024, 256), (17, 5), (1, 1)]:
        tiled = rank_metrics_from_features(qf, gf, qp, gp, qc, gc, metric=metric, chunk=chunk,
                                           query_chunk=query_chunk)
        np.testing.assert_array_equal(tiled.cmc, full.cmc)
        assert tiled.mAP == full.mAP and tiled.mINP == full.mINP
        np.testing.assert_array_equal(tiled.valid, full.valid)
    assert_matches_reference(full, pairwise_distance(qf, gf, metric).double(), qp, gp, qc, gc, 50)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_features_path_float64_matches_reference(metric):
    rng = np.random.default_rng(4)
    qf, gf = torch.randn(25, 16, dtype=torch.float64), torch.randn(140, 16, dtype=torch.float64)
    qp, gp = rng.integers(0, 6, 25), rng.integers(0, 6, 140)
    qc, gc = rng.integers(0, 3, 25), rng.integers(0, 3, 140)
    m = rank_metrics_from_features(qf, gf, qp, gp, qc, gc, metric=metric, chunk=32, query_chunk=8)
    if metric == "euclidean":
        ref_d = torch.cdist(qf, gf) ** 2
    else:
        ref_d = 1 - torch.nn.functional.normalize(qf, dim=1) @ torch.nn.functional.normalize(gf, dim=1).T
    assert_matches_reference(m, ref_d, qp, gp, qc, gc, 50)


# --- the ops ----------------------------------------------------------------------------------


def _op_inputs(device, dtype=torch.float32, seed=0):
    rng = np.random.default_rng(seed)
    dist, qp, gp, qc, gc = make_problem(rng, 9, 40, num_ids=4)
    d = torch.as_tensor(dist, dtype=dtype, device=device)
    offsets = torch.tensor([0, 2, 2, 5, 6, 6, 6, 8, 9, 10], device=device)
    pos_gidx = torch.as_tensor(rng.integers(0, 40, 10), device=device)
    pos_dist = torch.as_tensor(rng.integers(0, 6, 10), dtype=dtype, device=device)
    return d, torch.as_tensor(qp, device=device), torch.as_tensor(gp, device=device), offsets, pos_dist, pos_gidx


def test_sort_op_orders_by_distance_then_index(device):
    offsets = torch.tensor([0, 4, 4, 7], device=device)
    d = torch.tensor([0.5, 0.25, 0.5, 0.25, 1.0, 0.0, 1.0], device=device)
    g = torch.tensor([9, 8, 3, 12, 2, 5, 1], device=device)
    sd, sg = torch.ops.edaan_fast._rank_sort_positives(offsets, d, g)
    assert sd.tolist() == [0.25, 0.25, 0.5, 0.5, 0.0, 1.0, 1.0]
    assert sg.tolist() == [8, 12, 3, 9, 5, 1, 2]


def test_count_op_is_additive_over_column_blocks(device):
    d, qp, gp, off, pd, pg = _op_inputs(device)
    pd, pg = torch.ops.edaan_fast._rank_sort_positives(off, pd, pg)
    whole = torch.ops.edaan_fast._rank_count_preceding(d, qp, gp, off, pd, pg, 0)
    parts = sum(
        torch.ops.edaan_fast._rank_count_preceding(d[:, a:b], qp, gp[a:b], off, pd, pg, a)
        for a, b in [(0, 13), (13, 14), (14, 40)]
    )
    assert torch.equal(whole, parts)
    # brute force: negatives (other pid) with a smaller (distance, index) key
    for q in range(d.shape[0]):
        for k in range(int(off[q]), int(off[q + 1])):
            j = torch.arange(d.shape[1], device=device)
            before = (d[q] < pd[k]) | ((d[q] == pd[k]) & (j < pg[k]))
            assert int(whole[k]) == int((before & (gp != qp[q])).sum())


def test_count_op_flags_nan(device):
    d, qp, gp, off, pd, pg = _op_inputs(device)
    d[2, 7] = float("nan")  # query 2 holds positives 2..4
    counts = torch.ops.edaan_fast._rank_count_preceding(d, qp, gp, off, pd, pg, 0)
    assert (counts[2:5] == NAN_FLAG).all() and (counts[:2] >= 0).all() and (counts[5:] >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(device, dtype):
    d, qp, gp, off, pd, pg = _op_inputs(device, dtype)
    torch.library.opcheck(torch.ops.edaan_fast._rank_sort_positives.default, (off, pd, pg))
    pd, pg = torch.ops.edaan_fast._rank_sort_positives(off, pd, pg)
    torch.library.opcheck(torch.ops.edaan_fast._rank_count_preceding.default, (d, qp, gp, off, pd, pg, 3))


def test_compile_fullgraph():
    d, qp, gp, off, pd, pg = _op_inputs("cpu")

    def f(d, qp, gp, off, pd, pg):
        sd, sg = torch.ops.edaan_fast._rank_sort_positives(off, pd, pg)
        return torch.ops.edaan_fast._rank_count_preceding(d, qp, gp, off, sd, sg, 0) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(d, qp, gp, off, pd, pg), f(d, qp, gp, off, pd, pg))


def test_compile_inductor():
    """The default backend (inductor): both rank ops and the distance-tile GEMM as extern
    kernels next to inductor's own generated code."""
    d, qp, gp, off, pd, pg = _op_inputs("cpu")
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(9, 16, generator=gen), torch.randn(40, 16, generator=gen)

    def f(d, qp, gp, off, pd, pg, a, b):
        sd, sg = torch.ops.edaan_fast._rank_sort_positives(off, pd, pg)
        counts = torch.ops.edaan_fast._rank_count_preceding(d, qp, gp, off, sd, sg, 0)
        return counts + 1, sg * 2, torch.ops.edaan_fast._distance_gemm(a, b) - 1

    compiled = torch.compile(f, fullgraph=True)
    got = compiled(d, qp, gp, off, pd, pg, a, b)
    want = f(d, qp, gp, off, pd, pg, a, b)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(got[2], a.double() @ b.double().T - 1, check_dtype=False)


def test_op_input_checks(device):
    # every device checks pos_offsets: on CUDA bad offsets would read and write out of bounds
    d, qp, gp, off, pd, pg = _op_inputs(device)
    count = torch.ops.edaan_fast._rank_count_preceding
    sort = torch.ops.edaan_fast._rank_sort_positives
    with pytest.raises(RuntimeError, match="_rank_count_preceding: dist must be a 2-D"):
        count(d[0], qp, gp, off, pd, pg, 0)
    with pytest.raises(RuntimeError, match="_rank_count_preceding: dist must be floating point"):
        count(d.long(), qp, gp, off, pd.long(), pg, 0)
    with pytest.raises(RuntimeError, match=r"_rank_count_preceding: q_pids must be int64 \[9\]"):
        count(d, qp[:3], gp, off, pd, pg, 0)
    with pytest.raises(RuntimeError, match=r"_rank_count_preceding: g_pids must be int64 \[40\]"):
        count(d, qp, gp.int(), off, pd, pg, 0)
    with pytest.raises(RuntimeError, match=r"_rank_count_preceding: pos_offsets must be int64 \[10\]"):
        count(d, qp, gp, off[:-1], pd, pg, 0)
    with pytest.raises(RuntimeError, match="_rank_count_preceding: pos_dist must be a 1-D tensor of the dtype"):
        count(d, qp, gp, off, pd.double(), pg, 0)
    with pytest.raises(RuntimeError, match=r"_rank_count_preceding: pos_gidx must be int64 \[10\]"):
        count(d, qp, gp, off, pd, pg[:4], 0)
    with pytest.raises(RuntimeError, match="_rank_count_preceding: g_offset .* must be >= 0"):
        count(d, qp, gp, off, pd, pg, -1)
    with pytest.raises(RuntimeError, match="_rank_count_preceding: pos_offsets must run from 0 to 10"):
        count(d, qp, gp, off + 1, pd, pg, 0)
    bad = off.clone()
    bad[2] = 1
    with pytest.raises(RuntimeError, match="_rank_count_preceding: pos_offsets must be non-decreasing"):
        count(d, qp, gp, bad, pd, pg, 0)
    with pytest.raises(RuntimeError, match=r"_rank_sort_positives: pos_offsets must be int64"):
        sort(off.int(), pd, pg)
    with pytest.raises(RuntimeError, match="_rank_sort_positives: pos_dist must be a 1-D floating point"):
        sort(off, pg, pg)
    with pytest.raises(RuntimeError, match=r"_rank_sort_positives: pos_gidx must be int64 \[10\]"):
        sort(off, pd, pg[:3])
    with pytest.raises(RuntimeError, match="_rank_sort_positives: pos_offsets must run from 0 to 10"):
        sort(off[:5], pd, pg)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_including_many_positives(dtype):
    rng = np.random.default_rng(9)
    # few ids: hundreds of positives per query exercise the global-memory path (> 512)
    for num_ids in (30, 2):
        dist, qp, gp, qc, gc = make_problem(rng, 50, 3000, num_ids=num_ids, levels=50)
        d = torch.as_tensor(dist).to(dtype)
        a = rank_metrics(d, qp, gp, qc, gc)
        b = rank_metrics(d.cuda(), qp, gp, qc, gc)
        np.testing.assert_array_equal(a.cmc, b.cmc)
        assert a.mAP == b.mAP and a.mINP == b.mINP


# --- distributed: a gallery sharded over two gloo processes ----------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, problem, bounds, results):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dmat, qf, gf, qp, gp, qc, gc = problem
        a, b = bounds[rank]
        m = rank_metrics(dmat[:, a:b], qp, gp[a:b], qc, gc[a:b], max_rank=20, group=dist.group.WORLD)
        f = rank_metrics_from_features(qf, gf[a:b], qp, gp[a:b], qc, gc[a:b], max_rank=20, chunk=7,
                                       group=dist.group.WORLD)
        results[rank] = (m.cmc, m.mAP, m.mINP, m.ap_per_query, f.cmc, f.mAP)
    finally:
        dist.destroy_process_group()


def test_distributed_gallery_shards_equal_single_process():
    import torch.multiprocessing as mp

    rng = np.random.default_rng(21)
    qf = torch.as_tensor(rng.integers(-2, 3, (30, 5)), dtype=torch.float32)
    gf = torch.as_tensor(rng.integers(-2, 3, (101, 5)), dtype=torch.float32)
    qp, gp = rng.integers(0, 8, 30), rng.integers(0, 8, 101)
    qc, gc = rng.integers(0, 3, 30), rng.integers(0, 3, 101)
    dmat = pairwise_distance(qf, gf)
    single = rank_metrics(dmat, qp, gp, qc, gc, max_rank=20)
    bounds = [(0, 44), (44, 101)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_dist_worker, args=(2, _free_port(), (dmat, qf, gf, qp, gp, qc, gc), bounds, results),
                 nprocs=2, join=True)
    for rank in range(2):
        cmc, m_ap, m_inp, ap, f_cmc, f_map = results[rank]
        np.testing.assert_array_equal(cmc, single.cmc)
        assert m_ap == single.mAP and m_inp == single.mINP
        np.testing.assert_array_equal(ap, single.ap_per_query)
        np.testing.assert_array_equal(f_cmc, single.cmc)
        assert f_map == single.mAP


# --- precision: half features, TF32 / bfloat16 GEMM settings ---------------------------------


def _feature_problem(seed=3, num_q=60, num_g=700, dim=256):
    rng = np.random.default_rng(seed)
    qp, gp = rng.integers(0, 40, num_q), rng.integers(0, 40, num_g)
    qc, gc = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
    centres = torch.randn(40, dim, generator=torch.Generator().manual_seed(seed)) * 4
    qf = centres[qp] + torch.randn(num_q, dim, generator=torch.Generator().manual_seed(seed + 1))
    gf = centres[gp] + torch.randn(num_g, dim, generator=torch.Generator().manual_seed(seed + 2))
    return qf + 20, gf + 20, qp, gp, qc, gc  # an offset: |q|^2 + |g|^2 >> 2 q.g differences


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_features_are_ranked_in_float32(device, half):
    qf, gf, qp, gp, qc, gc = _feature_problem()
    qh, gh = qf.to(half), gf.to(half)
    got = rank_metrics_from_features(qh.to(device), gh.to(device), qp, gp, qc, gc, chunk=128,
                                     query_chunk=16)
    want = rank_metrics_from_features(qh.float(), gh.float(), qp, gp, qc, gc)
    np.testing.assert_array_equal(got.ap_per_query, want.ap_per_query)
    assert got.mAP == want.mAP and np.isfinite(got.mAP)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_tiles_keep_full_float32_when_reduced_precision_is_allowed(device, metric):
    qf, gf, qp, gp, qc, gc = _feature_problem(seed=5)
    qf, gf = qf.to(device), gf.to(device)
    want = rank_metrics_from_features(qf, gf, qp, gp, qc, gc, metric=metric, chunk=256,
                                      query_chunk=32)
    with reduced_precision_float32_gemms(device):
        got = rank_metrics_from_features(qf, gf, qp, gp, qc, gc, metric=metric, chunk=256,
                                         query_chunk=32)
    _assert_same_ranking(got, want)


def _assert_same_ranking(got: RankMetrics, want: RankMetrics) -> None:
    np.testing.assert_array_equal(got.ap_per_query, want.ap_per_query)
    np.testing.assert_array_equal(got.cmc, want.cmc)
    assert got.mAP == want.mAP and got.mINP == want.mINP


# --- CUDA at the sizes of real runs ----------------------------------------------------------


@requires_cuda
def test_cuda_market_size_and_looping_blocks_equal_cpu_counts():
    """Market-1501's 3,368 x 15,913 and, with Q above the grid's block count, blocks that loop."""
    rng = np.random.default_rng(11)
    dist, qp, gp, qc, gc = make_problem(rng, 3368, 15913, num_ids=750, levels=200)
    d = torch.as_tensor(dist, dtype=torch.float32)
    a = rank_metrics(d, qp, gp, qc, gc)
    _assert_same_ranking(rank_metrics(d.cuda(), qp, gp, qc, gc), a)
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    q = sm * 16 * 2 + 7  # max_blocks() = 16 per SM: every block walks >= 2 queries
    dist, qp, gp, qc, gc = make_problem(rng, q, 300, num_ids=20, levels=20)
    d = torch.as_tensor(dist, dtype=torch.float32)
    off, pd, pg = _positives_of(d, qp, gp, qc, gc)
    counts = [torch.ops.edaan_fast._rank_count_preceding(
        d.to(dev), torch.as_tensor(qp, device=dev), torch.as_tensor(gp, device=dev),
        off.to(dev), pd.to(dev), pg.to(dev), 0).cpu() for dev in ("cpu", "cuda")]
    assert torch.equal(counts[0], counts[1]) and counts[0].sum() > 0


def _positives_of(d, qp, gp, qc, gc):
    """CSR positives (same pid, another camera), sorted, for calling the count op directly."""
    q_idx, g_idx = np.nonzero((qp[:, None] == gp[None, :]) & (qc[:, None] != gc[None, :]))
    off = torch.as_tensor(np.concatenate([[0], np.cumsum(np.bincount(q_idx, minlength=len(qp)))]))
    pd = d[torch.as_tensor(q_idx), torch.as_tensor(g_idx)]
    return (off, *torch.ops.edaan_fast._rank_sort_positives(off, pd, torch.as_tensor(g_idx)))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_features_path_equals_cpu(dtype):
    qf, gf, qp, gp, qc, gc = _feature_problem(seed=8, num_q=500, num_g=5000, dim=2048)
    qf, gf = qf.round().to(dtype), gf.round().to(dtype)  # integer features: exact products
    a = rank_metrics_from_features(qf, gf, qp, gp, qc, gc, chunk=1024, query_chunk=128)
    _assert_same_ranking(rank_metrics_from_features(qf.cuda(), gf.cuda(), qp, gp, qc, gc,
                                                    chunk=1024, query_chunk=128), a)


@requires_cuda
def test_cuda_ranking_on_a_side_stream_and_a_second_device():
    rng = np.random.default_rng(12)
    dist, qp, gp, qc, gc = make_problem(rng, 200, 2000, num_ids=50, levels=30)
    d = torch.as_tensor(dist, dtype=torch.float32)
    want = rank_metrics(d, qp, gp, qc, gc)
    devices = ["cuda:0"] + (["cuda:1"] if torch.cuda.device_count() > 1 else [])
    for dev in devices:
        stream = torch.cuda.Stream(device=dev)
        with torch.cuda.stream(stream):
            got = rank_metrics(d.to(dev), qp, gp, qc, gc)
        _assert_same_ranking(got, want)
