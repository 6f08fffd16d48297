"""Ranking evaluation: the sort-free fused evaluator vs the argsort reference, np.argsort of the
matrix alone, and (from features) the distance GEMM alone.

Problems (benchmarks/_rank_data.py, reproducible from a seed): Market-1501-sized
(3,368 queries x 15,913 gallery, 6 cameras, distractors and junk) and DukeMTMC-reID-sized
(2,228 x 17,661, 8 cameras), 2048-d features, ~15 positives per query, positives mostly but
not always closer than the negatives. The distance matrix is the float32 squared euclidean
matrix of those features.

    python3 -m pytest benchmarks/bench_rank_eval.py --benchmark-columns=median,min,rounds
    EDAAN_FAST_BENCH_QUICK=1 python3 -m pytest benchmarks/bench_rank_eval.py --benchmark-disable

Quick mode uses a 300 x 1,500 problem with 256-d features and skips the slow reference.

Speed floors (``test_speed_floor``, every mode, CPU), on a 1,000 x 5,000 problem with 256-d
features, interleaved on one thread (benchmarks/_timing.py): from the distance matrix, at least
20x faster than ``np.argsort`` of the matrix alone (29-61x measured on that problem; 200x at
Market size in RESULTS.md); from features, at least 0.33x the speed of the bare distance GEMM
(0.64-0.71x measured on that problem; 0.99x at Market size).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from benchmarks._rank_data import make_problem
from benchmarks._timing import check_floor, median_seconds, speedup
from edaan_fast.ops import (
    has_ops,
    pairwise_distance,
    rank_metrics,
    rank_metrics_from_features,
    reference,
)

QUICK = os.environ.get("EDAAN_FAST_BENCH_QUICK", "0") == "1"
SIZES = ["quick"] if QUICK else ["market", "duke"]
DIM = 256 if QUICK else 2048
ROUNDS = 3 if QUICK else 15
GEMM_ROUNDS = 2 if QUICK else 5

pytestmark = pytest.mark.skipif(not has_ops(), reason="compiled ops not built")

_problems: dict = {}
_medians: dict = {}


def problem(name):
    if name not in _problems:
        qf, gf, qp, gp, qc, gc = make_problem(name, dim=DIM)
        _problems[name] = (qf, gf, qp, gp, qc, gc, pairwise_distance(qf, gf))
    return _problems[name]


def _record(benchmark, key):
    median = median_seconds(benchmark)
    if median is not None:
        _medians[key] = median


def _ratio(benchmark, key, base, name):
    if key in _medians and base in _medians:
        benchmark.extra_info[name] = round(_medians[key] / _medians[base], 4)


@pytest.mark.parametrize("size", SIZES)
def test_argsort_alone(benchmark, size):
    dist = problem(size)[6].numpy()
    benchmark.group = f"rank-distmat-{size}"
    rounds = 1 if QUICK else 3
    benchmark.pedantic(lambda: np.argsort(dist, axis=1), rounds=rounds, iterations=1)
    _record(benchmark, (size, "argsort"))


@pytest.mark.parametrize("size", SIZES)
def test_fused_from_distmat(benchmark, size):
    qf, gf, qp, gp, qc, gc, dist = problem(size)
    benchmark.group = f"rank-distmat-{size}"
    m = benchmark.pedantic(lambda: rank_metrics(dist, qp, gp, qc, gc), rounds=ROUNDS, iterations=1,
                           warmup_rounds=1)
    benchmark.extra_info.update(rank1=float(m.cmc[0]), mAP=round(m.mAP, 4), mINP=round(m.mINP, 4),
                                GB=round(dist.numel() * 4 / 1e9, 3))
    _record(benchmark, (size, "fused"))
    _ratio(benchmark, (size, "fused"), (size, "argsort"), "fused/argsort")
    if (size, "fused") in _medians:
        benchmark.extra_info["GB/s"] = round(dist.numel() * 4 / 1e9 / _medians[(size, "fused")], 2)


@pytest.mark.parametrize("size", SIZES)
def test_argsort_reference(benchmark, size):
    if QUICK:
        pytest.skip("the argsort reference is slow; skipped in quick mode")
    qf, gf, qp, gp, qc, gc, dist = problem(size)
    benchmark.group = f"rank-distmat-{size}"
    ref = benchmark.pedantic(lambda: reference.rank_metrics(dist, qp, gp, qc, gc), rounds=1, iterations=1)
    m = rank_metrics(dist, qp, gp, qc, gc)
    assert np.array_equal(m.cmc, ref[0]) and abs(m.mAP - ref[1]) < 1e-9
    _record(benchmark, (size, "reference"))
    _ratio(benchmark, (size, "reference"), (size, "fused"), "reference/fused")


@pytest.mark.parametrize("size", SIZES)
def test_gemm_alone(benchmark, size):
    qf, gf = problem(size)[:2]
    benchmark.group = f"rank-features-{size}"
    benchmark.pedantic(lambda: torch.mm(qf, gf.t()), rounds=GEMM_ROUNDS, iterations=1)
    _record(benchmark, (size, "gemm"))


@pytest.mark.parametrize("size", SIZES)
def test_fused_from_features(benchmark, size):
    qf, gf, qp, gp, qc, gc, dist = problem(size)
    benchmark.group = f"rank-features-{size}"
    m = benchmark.pedantic(lambda: rank_metrics_from_features(qf, gf, qp, gp, qc, gc),
                           rounds=GEMM_ROUNDS, iterations=1)
    full = rank_metrics(dist, qp, gp, qc, gc)
    # the positives' distances come from a pairwise formula, the matrix from a GEMM: the
    # two can differ by float rounding, so only near-identical metrics are expected
    assert abs(m.mAP - full.mAP) < 1e-3
    benchmark.extra_info.update(rank1=float(m.cmc[0]), mAP=round(m.mAP, 4))
    _record(benchmark, (size, "features"))
    _ratio(benchmark, (size, "features"), (size, "gemm"), "features/gemm")


FLOORS = {"argsort/fused": 20.0, "gemm/features": 0.33}


@pytest.mark.parametrize("which", list(FLOORS))
def test_speed_floor(benchmark, which):
    qf, gf, qp, gp, qc, gc = make_problem("floor", dim=256)
    if which == "argsort/fused":
        dist = pairwise_distance(qf, gf)
        dn = dist.numpy()
        cases = {"base": lambda: np.argsort(dn, axis=1),
                 "fused": lambda: rank_metrics(dist, qp, gp, qc, gc)}
        rounds = 5
    else:
        cases = {"base": lambda: torch.mm(qf, gf.t()),
                 "fused": lambda: rank_metrics_from_features(qf, gf, qp, gp, qc, gc)}
        rounds = 7

    ratio = speedup(cases, rounds)
    benchmark.group = "speed floors"
    benchmark.pedantic(lambda: check_floor(f"rank 1000x5000: {which}", ratio, FLOORS[which],
                                           benchmark), rounds=1, iterations=1)
