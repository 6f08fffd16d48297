"""k-reciprocal re-ranking: the fused pipeline vs the naive dense N x N distance matrix, vs the
distance GEMM alone (2048-d), and vs fast-reid's numpy ``re_ranking``.

    python -m pytest benchmarks/bench_reranking.py --benchmark-only -o python_files='bench_*.py' -s
    EDAAN_FAST_BENCH_QUICK=1 python -m pytest benchmarks/bench_reranking.py -o python_files='bench_*.py'
    python benchmarks/bench_reranking.py --profile     # where the time goes (torch.profiler)
    python benchmarks/bench_reranking.py --msmt17      # MSMT17 size, next to its FLOP floor
    python -m benchmarks.bench_reranking --msmt17 --device cuda --json msmt17.json  # on a GPU

Each case runs its implementations *interleaved*, round by round (so a noisy machine slows
them alike), and reports medians and their ratio; the ratios are checked against the targets
and printed in the summary table of ``benchmarks/conftest.py``.

* ``market``: 3,368 queries x 15,913 gallery (N = 19,281), 128-d clustered float32 features
  (identities as clusters, like real embeddings). Baseline: the naive dense N x N distance
  matrix, one ``addmm`` (what fast-reid's ``re_ranking`` starts with). Target: the whole
  re-ranking in at most 2x its time.
* ``gemm2048``: 1,000 x 5,000 (N = 6,000), 2048-d features. Baseline: the N x N distance GEMM
  alone (``f @ f.T``). Target: at most 1.3x.
* ``fastreid``: 500 x 2,000 (N = 2,500), 128-d, distance blocks in float32: fast-reid's
  ``fastreid.evaluation.rerank.re_ranking`` (the package if importable; else the faithful copy
  below) against :func:`re_ranking` on the same blocks, with all threads and with one (numpy's
  loop is single-threaded; on a shared 2-core machine the thread pool's wake-ups can cost more
  than the work). Target: at least 20x (the better of the two).

* ``--msmt17`` (a script, ~6 GB): 11,659 x 82,161 (N = 93,820), 128-d, from features (add
  ``--blocks`` for the distance blocks: ~31 GB of them at this size). Baseline: the FLOP floor,
  the 2 N^2 D multiply-adds of the products at the same run's 4096^3 float32 GEMM rate. Target:
  at most 1.5x the floor, peak RSS at most the Q x G float32 output + 2 GB. ``--device cuda``
  runs it on the GPU (features there, the GEMM rate of ``distance_gemm``'s full float32,
  synchronised timing, peak GPU memory); ``--shape Q,G,D`` another size; ``--json PATH`` writes
  the figures (``python -m edaan_fast.gpu_check`` runs it so).

Quick mode (``EDAAN_FAST_BENCH_QUICK=1``, CI) runs every case on small problems, once, checks
the results against the float64 per-probe reference, and skips the targets. A missed target
is reported (xfail), not a failure.

Speed floors (``test_speed_floor``, every mode, CPU; they fail the run when missed), on fixed
problems interleaved on one thread (benchmarks/_timing.py), each about half the ratio measured
there: the re-ranking of 800 x 3,200 (N = 4,000, 128-d) at least 0.2x the speed of the dense
N x N distance matrix (0.41-0.47x measured; 0.68x at Market size in RESULTS.md); of 300 x 1,500
(2048-d) at least 0.3x the N x N GEMM alone (0.64-0.74x measured; 0.60x at 1,000 x 5,000); and at
least 12x fast-reid's ``re_ranking`` at 50 x 200 (17-35x measured; 26.3x at 500 x 2,000).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks._timing import check_floor, interleaved, speedup
from benchmarks.conftest import _RESULTS, QUICK
from edaan_fast.metrics.reranking import _reference_re_ranking, re_ranking, re_ranking_features
from edaan_fast.ops import has_ops

pytestmark = pytest.mark.skipif(not has_ops(), reason="compiled ops not built")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROBLEMS = {  # name: (Q, G, D, rounds)
    "market": (60, 240, 32, 1) if QUICK else (3368, 15913, 128, 3),
    "gemm2048": (40, 200, 256, 1) if QUICK else (1000, 5000, 2048, 3),
    "fastreid": (50, 200, 32, 1) if QUICK else (500, 2000, 128, 3),
}
TARGETS = {"market": 2.0, "gemm2048": 1.3}
FASTREID_TARGET = 20.0


def features(name: str, dtype=torch.float32, shape=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clustered features: ~8 images per identity around an identity centre, unit norm;
    ``shape`` = (Q, G, D) instead of the problem's own."""
    num_q, num_g, dim = shape or PROBLEMS[name][:3]
    g = torch.Generator().manual_seed(0)
    ids = max(2, (num_q + num_g) // 8)
    centres = torch.randn(ids, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, ids, (num_q + num_g,), generator=g)
    f = centres[labels] + 0.8 * torch.randn(num_q + num_g, dim, generator=g, dtype=torch.float64)
    f = torch.nn.functional.normalize(f, dim=1).to(dtype)
    return f[:num_q].contiguous(), f[num_q:].contiguous()


def _report(benchmark, group: str, medians: dict[str, float], baseline: str):
    benchmark.group = group
    for k, v in medians.items():
        _RESULTS[group][k] = {"median": v, "baseline": k == baseline}
        benchmark.extra_info[f"{k} median s"] = round(v, 4)


def _check_small(out: torch.Tensor, qf: torch.Tensor, gf: torch.Tensor, atol: float):
    f = torch.cat([qf, gf]).double()
    d = torch.cdist(f, f).numpy()
    nq = qf.shape[0]
    ref = _reference_re_ranking(d[:nq, nq:], d[:nq, :nq], d[nq:, nq:])
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=atol, rtol=0)


@pytest.mark.parametrize("name", ["market", "gemm2048"])
def test_against_the_distance_matrix(benchmark, name):
    qf, gf = (t.to(DEVICE) for t in features(name))
    f = torch.cat([qf, gf])
    sq = (f * f).sum(1)
    rounds = PROBLEMS[name][3]
    if name == "market":
        base = "dense N x N (addmm)"
        base_fn = lambda: torch.addmm(sq[:, None], f, f.t(), alpha=-2).add_(sq)  # noqa: E731
    else:
        base = "N x N GEMM alone"
        base_fn = lambda: f @ f.t()  # noqa: E731
    out = {}

    def rerank():
        out["d"] = re_ranking_features(qf, gf)

    medians = {}

    def run():
        medians.update(interleaved({base: base_fn, "re-ranking (fused)": rerank}, rounds,
                                   device=DEVICE))

    benchmark.pedantic(run, rounds=1, iterations=1)
    ratio = medians["re-ranking (fused)"] / medians[base]
    _report(benchmark, f"re_ranking {name} {qf.shape[0]}x{gf.shape[0]} {qf.shape[1]}-d", medians, base)
    benchmark.extra_info["re-ranking / baseline"] = round(ratio, 3)
    print(f"\n{name}: {medians} -> re-ranking / baseline = {ratio:.2f}x")
    assert out["d"].shape == (qf.shape[0], gf.shape[0])
    if QUICK:
        _check_small(out["d"], qf.cpu(), gf.cpu(), atol=1e-4)
    elif ratio > TARGETS[name]:
        pytest.xfail(f"target {TARGETS[name]}x not met: {ratio:.2f}x")  # reported, not hidden


# --- fast-reid's re_ranking -------------------------------------------------------------------
# fastreid 1.4.0 (pip) pins torch==1.13.1, so it cannot be installed next to torch 2.x; its
# fastreid/evaluation/rerank.py is plain numpy and is reproduced here line for line (Apache-2.0,
# based on https://github.com/zhunzhong07/person-re-ranking; torchreid's rerank.py is the same
# algorithm). When the package is importable, the package's function is used instead.


def _fastreid_re_ranking_copy(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    original_dist = np.concatenate(
        [np.concatenate([q_q_dist, q_g_dist], axis=1),
         np.concatenate([q_g_dist.T, g_g_dist], axis=1)],
        axis=0)
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1. * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist).astype(np.int32)

    query_num = q_g_dist.shape[0]
    gallery_num = q_g_dist.shape[0] + q_g_dist.shape[1]
    all_num = gallery_num

    for i in range(all_num):
        # k-reciprocal neighbors
        forward_k_neigh_index = initial_rank[i, :k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for j in range(len(k_reciprocal_index)):
            candidate = k_reciprocal_index[j]
            candidate_forward_k_neigh_index = initial_rank[candidate,
                                              :int(np.around(k1 / 2.)) + 1]
            candidate_backward_k_neigh_index = initial_rank[candidate_forward_k_neigh_index,
                                               :int(np.around(k1 / 2.)) + 1]
            fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
            candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2. / 3 * len(
                    candidate_k_reciprocal_index):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index,
                                                         candidate_k_reciprocal_index)

        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = 1. * weight / np.sum(weight)
    original_dist = original_dist[:query_num, ]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del initial_rank
    invIndex = []
    for i in range(gallery_num):
        invIndex.append(np.where(V[:, i] != 0)[0])

    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)

    for i in range(query_num):
        temp_min = np.zeros(shape=[1, gallery_num], dtype=np.float32)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(V[i, indNonZero[j]],
                                                                               V[indImages[j], indNonZero[j]])
        jaccard_dist[i] = 1 - temp_min / (2. - temp_min)

    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    del original_dist, V, jaccard_dist
    final_dist = final_dist[:query_num, query_num:]
    return final_dist


try:  # pragma: no cover - fastreid is not installable next to torch 2.x
    from fastreid.evaluation.rerank import re_ranking as fastreid_re_ranking

    FASTREID = "fastreid.evaluation.rerank.re_ranking (package)"
except Exception:  # noqa: BLE001 - any import failure: use the copy
    fastreid_re_ranking = _fastreid_re_ranking_copy
    FASTREID = "fast-reid re_ranking (copy of fastreid 1.4.0)"


def test_against_fastreid(benchmark):
    qf, gf = features("fastreid")
    f = torch.cat([qf, gf])
    d = torch.cdist(f, f)
    nq = qf.shape[0]
    blocks = [d[:nq, nq:].contiguous(), d[:nq, :nq].contiguous(), d[nq:, nq:].contiguous()]
    arrays = [b.numpy() for b in blocks]
    dev_blocks = [b.to(DEVICE) for b in blocks]
    out = {}

    def peer():
        out["peer"] = fastreid_re_ranking(*arrays)

    def ours():
        out["ours"] = re_ranking(*dev_blocks)

    def ours_1t():  # like for like with the single-threaded numpy loop
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            re_ranking(*dev_blocks)
        finally:
            torch.set_num_threads(old)

    medians = {}
    mine = "re-ranking (fused)"

    def run():
        medians.update(interleaved({FASTREID: peer, mine: ours, f"{mine}, 1 thread": ours_1t},
                                   PROBLEMS["fastreid"][3], device=DEVICE))

    benchmark.pedantic(run, rounds=1, iterations=1)
    speedup = medians[FASTREID] / min(medians[mine], medians[f"{mine}, 1 thread"])
    _report(benchmark, f"re_ranking vs fast-reid {nq}x{gf.shape[0]}", medians, FASTREID)
    benchmark.extra_info["speed-up"] = round(speedup, 2)
    print(f"\nfast-reid: {medians} -> speed-up {speedup:.1f}x")
    # float32 both: near-ties may swap, so compare in aggregate; float64 exactness is tested
    diff = np.abs(out["ours"].cpu().numpy() - out["peer"])
    assert diff.mean() < 1e-5 and (diff > 1e-4).mean() < 0.01
    if QUICK:  # exact in float64 against the per-probe reference
        b64 = [b.double() for b in blocks]
        ref = _reference_re_ranking(*(b.numpy() for b in b64))
        np.testing.assert_allclose(re_ranking(*b64).numpy(), ref, atol=1e-9, rtol=0)
    elif speedup < FASTREID_TARGET:
        pytest.xfail(f"target {FASTREID_TARGET}x not met: {speedup:.1f}x")


FLOOR_PROBLEMS = {"market": (800, 3200, 128), "gemm2048": (300, 1500, 2048),
                  "fastreid": (50, 200, 32)}
FLOORS = {"market": 0.2, "gemm2048": 0.3, "fastreid": 12.0}


@pytest.mark.parametrize("name", list(FLOORS))
def test_speed_floor(benchmark, name):
    if DEVICE != "cpu":
        pytest.skip("the floors are CPU measurements (benchmarks/RESULTS.md)")
    qf, gf = features(name, shape=FLOOR_PROBLEMS[name])
    f = torch.cat([qf, gf])
    if name == "fastreid":
        d = torch.cdist(f, f)
        nq = qf.shape[0]
        blocks = [d[:nq, nq:].contiguous(), d[:nq, :nq].contiguous(), d[nq:, nq:].contiguous()]
        arrays = [b.numpy() for b in blocks]
        cases = {"base": lambda: fastreid_re_ranking(*arrays), "fused": lambda: re_ranking(*blocks)}
        what, rounds = f"re-ranking {nq}x{gf.shape[0]}: fast-reid / fused", 5
    else:
        sq = (f * f).sum(1)
        if name == "market":
            base = lambda: torch.addmm(sq[:, None], f, f.t(), alpha=-2).add_(sq)  # noqa: E731
        else:
            base = lambda: f @ f.t()  # noqa: E731
        cases = {"base": base, "fused": lambda: re_ranking_features(qf, gf)}
        what = (f"re-ranking {qf.shape[0]}x{gf.shape[0]} {qf.shape[1]}-d: "
                f"{'dense N x N' if name == 'market' else 'N x N GEMM'} / fused")
        rounds = 3

    ratio = speedup(cases, rounds)
    benchmark.group = "speed floors"
    benchmark.pedantic(lambda: check_floor(what, ratio, FLOORS[name], benchmark), rounds=1,
                       iterations=1)


# --- MSMT17 scale (a script: ~6 GB and tens of seconds; not part of the pytest runs) --------

MSMT17 = (11_659, 82_161, 128)  # queries, gallery, feature dim: N = 93,820


def _peak_rss_gb() -> float:
    with open("/proc/self/status") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))
    return kb / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gemm_rate(n: int = 4096, rounds: int = 3, device: str | torch.device = "cpu") -> float:
    """The device's float32 GEMM rate (FLOP/s): the median of ``rounds`` n^3 products. On CUDA
    through ``distance_gemm``, the full-float32 product the re-ranking's tiles use (no TF32)."""
    from edaan_fast.ops.rank_eval import distance_gemm

    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
    mm = (lambda: distance_gemm(a, b)) if device.type == "cuda" else (lambda: a @ b)
    mm()  # warm-up
    times = []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        mm()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)


def msmt17(source: str = "features", shape=MSMT17, device: str = "cpu") -> dict:
    """One MSMT17-sized exact re-ranking (float32, 128-d, k1 = 20, k2 = 6) next to its FLOP floor:
    the 2 N^2 D multiply-adds of the N x N products (2.25 TFLOP at full size) at this run's
    4096^3 float32 GEMM rate on ``device`` (the mean of the rates measured just before and just
    after the re-ranking). On CUDA the features are on the GPU, a small re-ranking warms the
    kernels and cuBLAS up first, the time is taken between synchronisations, and the peak GPU
    memory is reported. ``source="blocks"`` times :func:`re_ranking` on the three distance
    blocks instead (they need Q G + Q^2 + G^2 float32 values: ~31 GB at full size)."""
    num_q, num_g, dim = shape
    n = num_q + num_g
    dev = torch.device(device)
    before = _gemm_rate(device=dev)
    qf, gf = (t.to(dev) for t in features("msmt17", shape=shape))
    if dev.type == "cuda":
        re_ranking_features(qf[:200], gf[:1000])  # warm-up: kernels, cuBLAS handles
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    if source == "blocks":
        f = torch.cat([qf, gf])
        blocks = [torch.cdist(qf, gf), torch.cdist(qf, qf), torch.cdist(gf, gf)]
        del f
        t0 = time.perf_counter()
        out = re_ranking(*blocks)
    else:
        t0 = time.perf_counter()
        out = re_ranking_features(qf, gf)
    _sync(dev)
    seconds = time.perf_counter() - t0
    assert out.shape == (num_q, num_g) and bool(torch.isfinite(out[:100]).all())
    del out
    after = _gemm_rate(device=dev)  # before and after: a load that changes during the run shows
    rate = (before + after) / 2
    floor = 2.0 * n * n * dim / rate
    return {"source": source, "device": str(dev) if dev.type == "cpu" else
            torch.cuda.get_device_name(dev), "Q": num_q, "G": num_g, "dim": dim,
            "threads": torch.get_num_threads(), "gemm_gflops": rate / 1e9,
            "gemm_gflops_before_after": (before / 1e9, after / 1e9), "floor_tflop":
            2.0 * n * n * dim / 1e12, "floor_s": floor, "seconds": seconds,
            "ratio_to_floor": seconds / floor, "target_ratio": 1.5,
            "peak_rss_gb": _peak_rss_gb(),
            "peak_gpu_gb": (torch.cuda.max_memory_allocated(dev) / 2**30
                            if dev.type == "cuda" else None),
            "output_gb": num_q * num_g * 4 / 2**30}


def _arg(name: str, default: str | None = None) -> str | None:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def _profile() -> None:
    """Where the time of the Market-sized re-ranking goes (CPU; torch.profiler op totals)."""
    from torch.profiler import ProfilerActivity, profile

    qf, gf = features("market")
    re_ranking_features(qf[:500], gf[:2000])  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        re_ranking_features(qf, gf)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    if "--profile" in sys.argv:
        _profile()
    elif "--msmt17" in sys.argv:
        # python benchmarks/bench_reranking.py --msmt17 [--blocks] [--device cuda]
        #     [--shape Q,G,D] [--json PATH]
        shape = tuple(int(x) for x in _arg("--shape", "")
                      .split(",")) if _arg("--shape") else MSMT17
        r = msmt17("blocks" if "--blocks" in sys.argv else "features", shape,
                   _arg("--device", "cpu"))
        print(f"MSMT17-sized re-ranking from {r['source']} on {r['device']}: {r['Q']:,} x "
              f"{r['G']:,}, {r['dim']}-d, {r['threads']} threads")
        b, a = r["gemm_gflops_before_after"]
        print(f"  4096^3 float32 GEMM: {b:.0f} GFLOP/s before, {a:.0f} after -> FLOP floor "
              f"{r['floor_tflop']:.3g} TFLOP / rate = {r['floor_s']:.3f} s at their mean")
        gpu = "" if r["peak_gpu_gb"] is None else f"; peak GPU memory {r['peak_gpu_gb']:.2f} GiB"
        print(f"  re-ranking: {r['seconds']:.3f} s = {r['ratio_to_floor']:.2f}x the floor "
              f"(target <= 1.5x); peak RSS {r['peak_rss_gb']:.2f} GiB (output "
              f"{r['output_gb']:.2f} GiB; target <= output + 2 GB){gpu}")
        if _arg("--json"):
            Path(_arg("--json")).write_text(json.dumps(r, indent=2) + "\n")
