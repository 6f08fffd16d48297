"""Re-ranking's fused k-NN from features (knn_features) against its twin, its GEMMs' precision
whatever float32 GEMM settings or autocast the caller has, the shared content checks the CUDA
ops run on the device, the build record of the CUDA architectures, and the CUDA paths (the
``cuda`` marker: skipped without a GPU)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import edaan_fast
from edaan_fast.metrics.reranking import _FeatureSource, re_ranking_features
from edaan_fast.ops import rank_eval, reference
from edaan_fast.ops import reranking as ops
from edaan_fast.ops._library import _arch_problem
from tests.conftest import DEVICES, reduced_precision_float32_gemms, requires_cuda, requires_ops

pytestmark = requires_ops


def _exact_features(seed, n, dim=16, dtype=torch.float32, dup=0):
    """Multiples of 1/64 up to 8 in magnitude: every product, squared norm and squared distance
    is exact in float32 (at most 24 significant bits), so any two correct GEMMs agree to the bit,
    while bfloat16 (8 bits) cannot hold the features."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randint(-512, 513, (n, dim), generator=g).to(torch.float64) / 64
    if dup:
        f[1 : 1 + dup] = f[0]  # `dup` exact copies of row 0: its first dup + 1 distances are 0
    return f.to(dtype)


def _knn_both(f, k, metric, lo, hi, K):
    sq = (f * f).sum(1) if metric == "euclidean" else None
    kept = torch.full((hi - lo, K), -1.0, dtype=f.dtype)
    got = ops.knn_features(f, k, metric, sq, lo, hi, kept)
    r_kept = torch.empty(hi - lo, K, dtype=f.dtype)
    want = reference.knn_features(f, k, metric, sq, lo, hi, r_kept)
    return got + (kept,), want + (r_kept,)


def _assert_same(got, want):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


# --- knn_features against its twin ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dup", [0, 40], ids=["distinct", "duplicates"])
def test_knn_features_equals_knn_lists_of_the_same_scores(dtype, dup):
    """N = 2,500 (three column blocks), rows 100..420 (three row blocks), k = 21; with 40 copies
    of a row, 41 rows have a k-th distance of exactly 0 and are redone exactly."""
    f = _exact_features(0, 2500, dtype=dtype, dup=dup)
    got, want = _knn_both(f, 21, "euclidean", 0 if dup else 100, 420, 700)
    _assert_same(got, want)
    if dup:
        assert bool((got[1][:41, -1] == 0).all())  # the rows that take the exact path


def test_knn_features_cosine_matches_the_twin():
    g = torch.Generator().manual_seed(1)
    f = torch.nn.functional.normalize(torch.randn(1300, 24, generator=g, dtype=torch.float64), dim=1)
    got, want = _knn_both(f, 11, "cosine", 1200, 1300, 300)
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=0)


def _division_tie():
    """Two float32 raw squared distances a < b that the division by the row scale c rounds to
    one M value."""
    c, a = np.float32(3.97), np.float32(1.985)
    for _ in range(4000):
        b = np.nextafter(a, np.float32(4))
        if np.float32(a / c) == np.float32(b / c):
            return float(a), float(b), float(c)
        a = b
    raise AssertionError("no pair found")


def test_knn_features_breaks_a_tie_made_by_the_division_on_the_index():
    """Row 0 (a zero feature, so its squared distances are the given norms): b at column 1 and
    a < b at column 1,500 round to the same M. The stable order on (M, index) takes column 1;
    an order on the raw values would take column 1,500."""
    a, b, c = _division_tie()
    n = 2000
    f = torch.zeros(n, 4)
    sq = torch.full((n,), 3.0)
    sq[0], sq[1], sq[1500], sq[n - 1] = 0.0, b, a, c
    nn, nd, sc = ops.knn_features(f, 2, "euclidean", sq, 0, 1)
    r_nn, r_nd, r_sc = reference.knn_features(f, 2, "euclidean", sq, 0, 1)
    assert a < b and nn[0].tolist() == [0, 1] == r_nn[0].tolist()
    assert torch.equal(nd, r_nd) and torch.equal(sc, r_sc)


def test_knn_features_flood_of_near_ties_is_redone_exactly():
    """5,000 squared distances within 1e-5 of each other (more than the near-tie buffer holds):
    the row is redone exactly and equals the twin."""
    n = 5002
    f = torch.zeros(n, 4, dtype=torch.float64)
    sq = 1e9 + torch.arange(n, dtype=torch.float64).flip(0)
    sq[0] = 0.0
    got, want = _knn_both_sq(f, sq, 9)
    _assert_same(got, want)
    assert got[0][0, 1:].tolist() == list(range(n - 1, n - 9, -1))


def _knn_both_sq(f, sq, k):
    return ops.knn_features(f, k, "euclidean", sq, 0, 3), reference.knn_features(
        f, k, "euclidean", sq, 0, 3)


def test_knn_features_reports_a_non_finite_row():
    f = _exact_features(2, 300, dtype=torch.float64)
    f[7, 3] = float("nan")
    _, _, sc = ops.knn_features(f, 5, "euclidean", (f * f).sum(1), 0, 20)
    assert bool(sc.isnan().all())  # every row meets the NaN column
    with pytest.raises(ValueError, match="re_ranking_features: qf must be finite"):
        re_ranking_features(f[:20], f[20:])


@pytest.mark.parametrize("call, match", [
    (lambda f, sq: ops.knn_features(f[0], 3, "euclidean", sq), "knn_features: features must be a 2-D"),
    (lambda f, sq: ops.knn_features(f.half(), 3, "cosine"), "knn_features: features must be float32 or float64, got Half"),
    (lambda f, sq: ops.knn_features(f, 3, "distance"), 'knn_features: metric must be "euclidean" or "cosine"'),
    (lambda f, sq: ops.knn_features(f, 51, "euclidean", sq), r"knn_features: k must be in \[1, N = 50\]"),
    (lambda f, sq: ops.knn_features(f, 3, "euclidean", sq, 10, 60), r"knn_features: rows must satisfy 0 <= row_start <= row_end <= N = 50, got 10 .. 60"),
    (lambda f, sq: ops.knn_features(f, 3, "euclidean", sq[:49]), r"knn_features: sq must be Double \[50\]"),
    (lambda f, sq: ops.knn_features(f, 3, "euclidean", sq, 0, 5, torch.zeros(4, 2, dtype=torch.float64)), r"knn_features: kept must be Double \[5, K <= 50\]"),
])
def test_knn_features_input_checks(call, match):
    f = _exact_features(3, 50, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=match):
        call(f, (f * f).sum(1))


def test_knn_features_opcheck():
    f = _exact_features(4, 60, dtype=torch.float64)
    kept = torch.zeros(10, 20, dtype=torch.float64)
    torch.library.opcheck(torch.ops.edaan_fast.knn_features.default,
                          (f, (f * f).sum(1), 5, 15, 7, "euclidean", kept))


# --- precision: what the caller's settings must not change -----------------------------------


@contextlib.contextmanager
def _every_reduced_setting(device_type="cpu"):
    """TF32 cuBLAS and bfloat16 oneDNN float32 GEMMs allowed (what
    set_float32_matmul_precision("medium") switches on), inside a bfloat16 autocast."""
    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    before = (cuda.fp32_precision, mkldnn.fp32_precision)
    cuda.fp32_precision, mkldnn.fp32_precision = "tf32", "bf16"
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    finally:
        cuda.fp32_precision, mkldnn.fp32_precision = before


def test_reduced_precision_settings_change_neither_neighbours_nor_result():
    f = _exact_features(5, 700)
    qf, gf = f[:150], f[150:]
    src = _FeatureSource(qf, gf, "euclidean", torch.float32)
    want_knn = ops.knn_features(src.f, 21, "euclidean", src.sq)
    want_tile = src.tile(0, 200, None)
    want_lists = ops.knn_lists(want_tile, 21, "euclidean", src.sq[:200], src.sq)
    want = re_ranking_features(qf, gf)
    with _every_reduced_setting():
        plain = torch.mm(f, f.t())
        got_knn = ops.knn_features(src.f, 21, "euclidean", src.sq)
        got_tile = src.tile(0, 200, None)
        got_lists = ops.knn_lists(got_tile, 21, "euclidean", src.sq[:200], src.sq)
        got = re_ranking_features(qf, gf)
    exact = f.double() @ f.double().t()
    assert float((plain.double() - exact).abs().max()) > 1e-2  # the settings do bite a plain GEMM
    assert got_tile.dtype == torch.float32 and torch.equal(got_tile, want_tile)
    _assert_same(got_knn, want_knn)
    _assert_same(got_lists, want_lists)
    assert torch.equal(got, want)


def test_distance_gemm_is_float32_under_autocast():
    f = _exact_features(6, 300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = rank_eval.distance_gemm(f[:40], f)
    assert got.dtype == torch.float32
    assert torch.equal(got, (f[:40].double() @ f.double().t()).float())


# --- the content checks both backends share --------------------------------------------------


def _csr(rows):
    ptr = torch.tensor([0] + list(np.cumsum([len(r) for r in rows])), dtype=torch.int64)
    col = torch.tensor([c for r in rows for c in r], dtype=torch.int64)
    return ptr, col, torch.full((col.numel(),), 0.5, dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_columns_must_be_strictly_ascending_within_a_row(device):
    """A gallery row holding a column twice would let two CUDA threads add into one
    accumulator: both backends refuse it with the same message."""
    q = [t.to(device) for t in _csr([[0, 2], [1]])]
    g = [t.to(device) for t in _csr([[0, 1], [2, 2], [3]])]
    dist = torch.rand(2, 3, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match=r"jaccard_rerank_: g indices must be strictly "
                       r"ascending within a row, got 2 then 2 in row 1"):
        ops.jaccard_rerank_(dist, *q, *g, 4, 0.3)
    g = [t.to(device) for t in _csr([[0, 1], [2], [3]])]
    q_bad = [t.to(device) for t in _csr([[2, 0], [1]])]
    with pytest.raises(RuntimeError, match="q indices must be strictly ascending"):
        ops.jaccard_rerank_(dist, *q_bad, *g, 4, 0.3)
    nn = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2]], device=device)
    v = [t.to(device) for t in _csr([[0, 1], [1, 0], [2], [3]])]
    with pytest.raises(RuntimeError, match="query_expansion: v indices must be strictly ascending"):
        ops.query_expansion(*v, nn, 2)
    bad_nn = nn.clone()
    bad_nn[2, 1] = 4
    with pytest.raises(RuntimeError, match=r"k_reciprocal_sets: nn entries must be row indices "
                       r"in \[0, 4\), got 4 in row 2"):
        ops.k_reciprocal_sets(bad_nn, torch.rand(4, 2, dtype=torch.float64, device=device), 1)
    ops.jaccard_rerank_(dist, *q, *g, 4, 0.3)  # the device is still usable
    assert bool(torch.isfinite(dist).all())


@pytest.mark.parametrize("device", DEVICES)
def test_nan_among_any_positive_flags_the_query(device):
    """A NaN at the first of a query's positives (not the last) flags its counts, on both
    backends (the CUDA kernel used to look at the last positive only)."""
    dist = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64, device=device)
    pids = torch.tensor([7, 1, 7, 2], device=device)
    q_pids = torch.tensor([7], device=device)
    offsets = torch.tensor([0, 2], device=device)
    pos_d = torch.tensor([float("nan"), 0.3], dtype=torch.float64, device=device)
    pos_g = torch.tensor([0, 2], device=device)
    counts = rank_eval.rank_count_preceding(dist, q_pids, pids, offsets, pos_d, pos_g, 0)
    assert counts.tolist() == [rank_eval.NAN_FLAG] * 2
    pos_d = torch.tensor([0.1, 0.3], dtype=torch.float64, device=device)
    counts = rank_eval.rank_count_preceding(dist, q_pids, pids, offsets, pos_d, pos_g, 0)
    assert counts.tolist() == [0, 1]


# --- the build record of the CUDA architectures ----------------------------------------------


def test_build_info_op_records_the_cuda_architectures():
    info = edaan_fast.build_info()
    assert "cuda_arch_list" in info
    if info["with_cuda"]:
        recorded = json.loads((Path(edaan_fast.__file__).parent / "_build_info.json").read_text())
        assert info["cuda_arch_list"] and info["cuda_arch_list"] == recorded["cuda_arch_list"]
    else:
        assert info["cuda_arch_list"] is None


@pytest.mark.parametrize("info, capability, fragment", [
    ({"with_cuda": True, "cuda_arch_list": "9.0"}, (8, 0), "built for CUDA architectures '9.0'"),
    ({"with_cuda": True, "cuda_arch_list": "8.0;9.0"}, (10, 0), 'TORCH_CUDA_ARCH_LIST="10.0"'),
    ({"with_cuda": True, "cuda_arch_list": "8.0;9.0+PTX"}, (10, 0), None),
    ({"with_cuda": True, "cuda_arch_list": "8.0;9.0+PTX"}, (8, 6), None),
    ({"with_cuda": True, "cuda_arch_list": None}, (7, 0), None),
    ({"with_cuda": False, "cuda": None, "torch": "2.14.1"}, (9, 0), "built without CUDA kernels"),
])
def test_arch_check_names_the_gpu_it_cannot_serve(info, capability, fragment):
    problem = _arch_problem("knn_lists", info, capability, "NVIDIA A100")
    if fragment is None:
        assert problem is None
    else:
        assert problem is not None and fragment in problem and problem.startswith(
            "edaan_fast.knn_lists:")


# --- the CUDA kernel's split of a row, run on the CPU (_knn_lists_sliced) ----------------------
# The CUDA knn_lists gives each row to threads_per_row threads: each keeps the k best of its
# column slice (slice_topk), each warp merges its 32 lists and one thread merges the warps'
# (merge_topk); _knn_lists_sliced runs those header functions on the CPU.


def _sliced(scores, k, metric="distance", row_sq=None, col_sq=None, threads=256):
    empty = scores.new_empty(0)
    return torch.ops.edaan_fast._knn_lists_sliced(
        scores, empty if row_sq is None else row_sq, empty if col_sq is None else col_sq, k,
        metric, threads)


@pytest.mark.parametrize("threads", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("metric", ["distance", "euclidean", "cosine"])
def test_sliced_knn_equals_the_whole_row_scan(threads, dtype, metric):
    """Slices of the row, merged per warp and across warps: the CPU's lists to the bit, ties
    (integer features, duplicated rows: equal values broken by the lower column) included."""
    f = _exact_features(11, 700, dim=4, dtype=dtype, dup=5).round()
    sq = (f * f).sum(1)
    if metric == "distance":
        scores, rs, cs = torch.cdist(f[:40].double(), f.double()).to(dtype), None, None
    elif metric == "euclidean":
        scores, rs, cs = f[:40] @ f.t(), sq[:40], sq
    else:
        u = torch.nn.functional.normalize(f, dim=1)
        scores, rs, cs = u[:40] @ u.t(), None, None
    for k in (1, 9, 21):
        _assert_same(_sliced(scores, k, metric, rs, cs, threads),
                     ops.knn_lists(scores, k, metric, rs, cs))


@pytest.mark.parametrize("threads", [32, 256])
def test_sliced_knn_k_larger_than_a_slice(threads):
    """N = 300 columns over 256 threads: a slice holds one or two columns, k = 50 or all 300
    columns; every list is short and the merges must still give the k best."""
    f = _exact_features(12, 300, dim=3, dtype=torch.float64).round()
    scores = torch.cdist(f[:17], f)
    for k in (2, 50, 300):
        _assert_same(_sliced(scores, k, threads=threads), ops.knn_lists(scores, k))


def test_sliced_knn_all_equal_row_and_nan_rows():
    scores = torch.ones(5, 200, dtype=torch.float64)  # every value ties: the first k columns
    scores[2, 7] = float("nan")
    scores[3, 9] = float("inf")
    nn, nd, sc = _sliced(scores, 12, threads=128)
    want = ops.knn_lists(scores, 12)
    assert torch.equal(nn[[0, 1, 4]], torch.arange(12).expand(3, 12))
    assert torch.equal(nn, want[0]) and torch.equal(sc.isnan(), want[2].isnan())
    assert bool(sc[2].isnan()) and bool(sc[3].isinf())  # reported by the caller, as on the CPU
    assert torch.equal(nd.isnan(), want[1].isnan())
    assert torch.equal(torch.nan_to_num(nd), torch.nan_to_num(want[1]))


def test_sliced_knn_checks_its_thread_count():
    with pytest.raises(RuntimeError, match="threads_per_row must be a multiple of 32"):
        _sliced(torch.rand(2, 10, dtype=torch.float64), 3, threads=48)


def test_cuda_tile_rows_come_from_the_device_not_from_n(monkeypatch):
    """Four waves of the k-NN kernel's resident blocks (132 SMs x 8 blocks of 256 threads on an
    H100), whatever N; an eighth of the free memory caps it."""
    from edaan_fast.metrics.reranking import _Source

    props = type("Props", (), {"multi_processor_count": 132,
                               "max_threads_per_multi_processor": 2048})()
    free = [80 << 30]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 80 << 30))
    cuda = torch.device("cuda", 0)
    for n in (2_000, 19_281, 93_820):
        assert _Source(n // 8, n - n // 8, torch.float32, cuda).default_chunk() == 4 * 132 * 8
    free[0] = 1 << 30
    assert _Source(11_659, 82_161, torch.float32, cuda).default_chunk() == (1 << 27) // (93_820 * 4)


# --- CUDA (skipped without a GPU) -------------------------------------------------------------


@requires_cuda
def test_cuda_knn_loops_over_rows_on_a_side_stream():
    """More rows than the grid has warps (each warp loops over several rows), on a side stream,
    against the CPU; and on a second GPU where there is one."""
    f = _exact_features(7, 20_100, dim=8, dtype=torch.float64)
    scores = f[:20_000, :] @ f[:64].t()  # [20,000, 64] tile
    want = ops.knn_lists(scores, 9, "distance")
    devices = ["cuda:0"] + (["cuda:1"] if torch.cuda.device_count() > 1 else [])
    for dev in devices:
        stream = torch.cuda.Stream(device=dev)
        with torch.cuda.stream(stream):
            got = ops.knn_lists(scores.abs().to(dev) * 0 + scores.to(dev), 9, "distance")
        stream.synchronize()
        _assert_same(tuple(t.cpu() for t in got), want)


@requires_cuda
@pytest.mark.parametrize("n", [1_500, 3_000, 6_000, 20_000, 93_820])
def test_cuda_knn_several_warps_per_row(n):
    """Rows long enough for 1, 2, 4 and 8 warps per row (knn_row_warps: 64 columns a thread),
    more rows than the grid keeps resident (blocks loop over rows), ties, kept columns: the
    CPU's lists, values, scales and kept columns to the bit (on an H100 the grid is 4,224
    blocks of one or two warps and 2,112 / 1,056 of four / eight)."""
    f = _exact_features(13, n, dim=4, dtype=torch.float64, dup=3).round()
    rows = 5_000 if n <= 6_000 else 2_500 if n <= 20_000 else 40  # > the grid (4,224 / 1,056)
    probes = torch.cat([f[:40], _exact_features(15, rows - 40, dim=4, dtype=torch.float64).round()])
    scores = torch.cdist(probes, f)
    kept = torch.full((rows, 100), -1.0, dtype=torch.float64)
    want = ops.knn_lists(scores, 21, "distance", kept=kept)
    got_kept = kept.cuda().fill_(-1.0)
    got = ops.knn_lists(scores.cuda(), 21, "distance", kept=got_kept)
    _assert_same(tuple(t.cpu() for t in got), want)
    assert torch.equal(got_kept.cpu(), kept)
    for k in (1, 64, 200):  # k beyond a thread's slice at the shorter rows
        _assert_same(tuple(t.cpu() for t in ops.knn_lists(scores[:300].cuda(), k)),
                     ops.knn_lists(scores[:300], k))


@requires_cuda
def test_cuda_knn_nan_row_among_long_rows():
    f = _exact_features(14, 9_000, dim=4, dtype=torch.float64)
    scores = torch.cdist(f[:600], f)
    scores[5, 4_321] = float("nan")
    nn, nd, sc = (t.cpu() for t in ops.knn_lists(scores.cuda(), 21))
    w_nn, w_nd, w_sc = ops.knn_lists(scores, 21)
    assert bool(sc[5].isnan()) and torch.equal(nn, w_nn)
    ok = torch.arange(600) != 5
    assert torch.equal(nd[ok], w_nd[ok]) and torch.equal(sc[ok], w_sc[ok])


@requires_cuda
def test_cuda_jaccard_reuses_blocks_for_many_queries():
    g = torch.Generator().manual_seed(8)
    f = torch.randn(6000, 6, generator=g, dtype=torch.float64)
    a = re_ranking_features(f[:3000], f[3000:], k1=5, k2=3)
    b = re_ranking_features(f[:3000].cuda(), f[3000:].cuda(), k1=5, k2=3)
    torch.testing.assert_close(b.cpu(), a, atol=1e-12, rtol=0)


@requires_cuda
def test_cuda_neighbours_ignore_tf32():
    """Exact-representable features: cuBLAS under TF32 settings must give the CPU's
    neighbour lists and result to the bit, because re-ranking's GEMMs stay in float32."""
    f = _exact_features(9, 1500)
    want = re_ranking_features(f[:300], f[300:])
    with reduced_precision_float32_gemms("cuda"):
        got = re_ranking_features(f[:300].cuda(), f[300:].cuda())
    torch.testing.assert_close(got.cpu(), want, atol=1e-6, rtol=0)
