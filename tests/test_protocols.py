"""Protocols: Market/Duke, CUHK03 single-gallery-shot, PRID2011, result table."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edaan_fast.metrics.protocols import (
    ProtocolResult,
    _sample_keys,  # only for the unit test of the keys themselves
    cuhk03_single_gallery_shot,
    format_table,
    market_duke,
    mean_result,
    prid2011,
)
from tests.conftest import DEVICES, requires_ops
from tests.oracles import market_loop

pytestmark = requires_ops


def _problem(seed, num_q=20, num_g=60, ids=8, cams=3, ties=False):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, ids, num_q)
    g_pids = rng.integers(0, ids, num_g)
    q_cams = rng.integers(0, cams, num_q)
    g_cams = rng.integers(0, cams, num_g)
    d = rng.random((num_q, num_g))
    if ties:
        d = np.round(d * 6) / 6
    return d, q_pids, g_pids, q_cams, g_cams


def _cuhk03_draws(d, qp, gp, qc, gc, repeats, rng, max_rank):
    """eval_cuhk03's semantics with numpy's own random draws: per valid query and repeat, one
    valid gallery image per identity uniformly at random, the CMC of the drawn positive among
    the drawn images (stable order on (distance, index)). Returns the mean CMC over queries and
    repeats and its standard error (from the spread of each query's draws)."""
    num_q, num_g = d.shape
    length = min(max_rank, len(np.unique(gp)))
    means, variances = [], []
    for i in range(num_q):
        keep = ~((gp == qp[i]) & (gc == qc[i]))
        if not (keep & (gp == qp[i])).any():
            continue
        groups = [np.nonzero(keep & (gp == pid))[0] for pid in np.unique(gp)]
        groups = [g for g in groups if g.size]
        drawn = np.stack([g[rng.integers(0, g.size, repeats)] for g in groups], 1)  # [R, ids]
        is_pos = gp[drawn] == qp[i]
        pos = drawn[is_pos]  # the drawn positive of each repeat
        dd, dp = d[i, drawn], d[i, pos][:, None]
        before = (dd < dp) | ((dd == dp) & (drawn < pos[:, None]))
        rank = (before & ~is_pos).sum(1)
        hits = (rank[:, None] <= np.arange(length)[None, :]).astype(np.float64)  # [R, length]
        means.append(hits.mean(0))
        variances.append(hits.var(0, ddof=1) / repeats)
    n = len(means)
    return np.sum(means, 0) / n, np.sqrt(np.sum(variances, 0)) / n


def _index_correlated_problem(seed, num_q=15, num_g=50, ids=7, cams=3, ties=False):
    """Like _problem, with distances that grow with the gallery index (plus noise): a sampler
    that favours low or high indices within an identity changes the CMC."""
    d, qp, gp, qc, gc = _problem(seed, num_q, num_g, ids, cams)
    d = 0.5 * d + 0.5 * np.arange(num_g)[None, :] / num_g
    if ties:
        d = np.round(d * 6) / 6
    return d, qp, gp, qc, gc


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_market_duke_matches_loop(device, ties):
    d, qp, gp, qc, gc = _problem(0, ties=ties)
    res = market_duke(torch.tensor(d, device=device), qp, gp, qc, gc, max_rank=20)
    cmc, mAP, mINP, n = market_loop(d, qp, gp, qc, gc, 20)
    np.testing.assert_allclose(res.cmc, cmc, atol=1e-6)
    assert res.mAP == pytest.approx(mAP, abs=1e-9)
    assert res.mINP == pytest.approx(mINP, abs=1e-9)
    assert res.num_valid == n
    assert (res.rank1, res.rank5, res.rank10, res.rank20) == pytest.approx(
        (cmc[0], cmc[4], cmc[9], cmc[19]), abs=1e-6
    )


def test_market_duke_from_features_equals_distmat():
    rng = np.random.default_rng(1)
    qf, gf = rng.normal(size=(12, 16)), rng.normal(size=(40, 16))
    _, qp, gp, qc, gc = _problem(1, num_q=12, num_g=40)
    d = ((qf[:, None] - gf[None]) ** 2).sum(-1)
    a = market_duke((torch.tensor(qf), torch.tensor(gf)), qp, gp, qc, gc)
    b = market_duke(d, qp, gp, qc, gc)
    np.testing.assert_allclose(a.cmc, b.cmc)
    assert a.mAP == pytest.approx(b.mAP, abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_cuhk03_matches_independent_draws(device, ties):
    """The mean CMC over many repeats agrees with numpy's own draws within a few standard
    errors (deterministic seeds: no flakiness, but a sampler that favours some images, draws
    from the junk, or averages wrongly is far outside)."""
    d, qp, gp, qc, gc = _index_correlated_problem(2, ties=ties)
    repeats, oracle_repeats = 400, 4000
    res = cuhk03_single_gallery_shot(
        torch.tensor(d, device=device), qp, gp, qc, gc,
        repeats=repeats, seed=3, max_rank=10, chunk_elems=200,
    )
    want, se = _cuhk03_draws(d, qp, gp, qc, gc, oracle_repeats, np.random.default_rng(0), 10)
    assert len(res.cmc) == min(10, len(np.unique(gp))) == len(want)
    # the two estimates' difference: standard error sqrt(se^2 (1 + oracle_repeats / repeats))
    tol = 4.5 * se * np.sqrt(1 + oracle_repeats / repeats) + 1e-6
    assert np.all(np.abs(res.cmc - want) <= tol), (res.cmc, want, tol)
    assert 0.05 < want[0] < 0.95 and se[0] > 0  # a curve with room on both sides
    # AP/mINP: the whole junk-free gallery, as torchreid's eval_cuhk03 computes AP
    _, mAP, mINP, n = market_loop(d, qp, gp, qc, gc, 10)
    assert res.mAP == pytest.approx(mAP, abs=1e-9)
    assert res.mINP == pytest.approx(mINP, abs=1e-9)
    assert res.num_valid == n


def test_cuhk03_draws_each_image_of_an_identity_equally_often():
    """Query q (all of pid 0, camera 0) sees q single-image identities and image q of the
    five-image identity 9 closer than its one positive (camera 1), everything else farther:
    its positive is at rank q + 1 when image q is drawn, else q. So cmc[q] = (q + 1 - f_q) / 5,
    where f_q is the frequency with which image q of identity 9 is drawn for query q."""
    n = 5
    g_pids = np.array([0] + [9] * n + [10 + k for k in range(n - 1)])
    g_cams = np.ones(len(g_pids), int)
    d = np.full((n, len(g_pids)), 2.0)
    d[:, 0] = 1.0  # the positive
    for q in range(n):
        d[q, 1 + q] = 0.5  # image q of identity 9
        d[q, 1 + n : 1 + n + q] = 0.25  # q single-image identities
    repeats = 2000
    res = cuhk03_single_gallery_shot(d, np.zeros(n, int), g_pids, np.zeros(n, int), g_cams,
                                     repeats=repeats, seed=11, max_rank=n)
    freq = np.arange(1, n + 1) - n * res.cmc.astype(np.float64)
    se = np.sqrt((1 / n) * (1 - 1 / n) / repeats)  # 0.009
    np.testing.assert_allclose(freq, 1 / n, atol=4.5 * se)


def test_cuhk03_one_image_per_identity_is_market():
    """With a single gallery image per identity every draw is the same: the CMC is Market's."""
    rng = np.random.default_rng(4)
    g_pids = rng.permutation(30)
    q_pids = rng.integers(0, 30, 25)
    d = rng.random((25, 30))
    qc, gc = np.zeros(25, int), np.ones(30, int)
    a = cuhk03_single_gallery_shot(d, q_pids, g_pids, qc, gc, repeats=3)
    b = market_duke(d, q_pids, g_pids, qc, gc, max_rank=30)
    np.testing.assert_allclose(a.cmc, b.cmc, atol=1e-7)
    assert a.mAP == pytest.approx(b.mAP)


def test_cuhk03_deterministic_and_chunk_invariant():
    d, qp, gp, qc, gc = _problem(5, num_q=30, num_g=80, ids=10)
    a = cuhk03_single_gallery_shot(d, qp, gp, qc, gc, repeats=5, seed=7)
    b = cuhk03_single_gallery_shot(d, qp, gp, qc, gc, repeats=5, seed=7, chunk_elems=100)
    c = cuhk03_single_gallery_shot(d, qp, gp, qc, gc, repeats=5, seed=8)
    np.testing.assert_array_equal(a.cmc, b.cmc)
    assert not np.array_equal(a.cmc, c.cmc)


def test_sample_keys_draw_uniformly():
    """The largest of 3 keys falls on each of the 3 items about a third of the time."""
    keys = _sample_keys(0, 0, torch.arange(30000), torch.arange(3), 3)
    assert bool((keys >= 0).all())
    counts = torch.bincount(keys.argmax(1), minlength=3).double() / 30000
    assert torch.allclose(counts, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.015)
    # a different repeat draws differently
    assert not torch.equal(keys, _sample_keys(0, 1, torch.arange(30000), torch.arange(3), 3))


def test_cuhk03_rejects_zero_repeats():
    d, qp, gp, qc, gc = _problem(6)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        cuhk03_single_gallery_shot(d, qp, gp, qc, gc, repeats=0)


def test_prid2011_directions_and_mean():
    rng = np.random.default_rng(8)
    test_ids = np.arange(1, 11)
    # a2b: 10 queries of cam_a, gallery cam_b = the 10 test ids + 15 distractors (ids > 200)
    g_b = np.concatenate([test_ids, 200 + np.arange(1, 16)])
    g_a = np.concatenate([test_ids, 200 + np.arange(1, 6)])
    d_ab, d_ba = rng.random((10, len(g_b))), rng.random((10, len(g_a)))
    out = prid2011(d_ab, test_ids, g_b, d_ba, test_ids, g_a)
    assert set(out) == {"a2b", "b2a", "mean"}
    ref_ab = market_loop(d_ab, test_ids, g_b, np.zeros(10, int), np.ones(len(g_b), int), 20)
    ref_ba = market_loop(d_ba, test_ids, g_a, np.zeros(10, int), np.ones(len(g_a), int), 20)
    np.testing.assert_allclose(out["a2b"].cmc, ref_ab[0], atol=1e-6)
    np.testing.assert_allclose(out["b2a"].cmc, ref_ba[0][:15], atol=1e-6)
    assert len(out["b2a"].cmc) == 15  # gallery of 15: the CMC is cut there
    assert out["mean"].rank1 == pytest.approx((ref_ab[0][0] + ref_ba[0][0]) / 2, abs=1e-6)
    assert out["mean"].rank20 == pytest.approx((ref_ab[0][14] + ref_ba[0][14]) / 2, abs=1e-6)
    assert out["mean"].mAP == pytest.approx((ref_ab[1] + ref_ba[1]) / 2, abs=1e-9)


def test_prid2011_perfect_features_score_one():
    rng = np.random.default_rng(9)
    ids = np.arange(1, 21)
    fa = rng.normal(size=(20, 8))
    fb = np.concatenate([fa + 1e-3, rng.normal(size=(30, 8)) * 10])
    gb = np.concatenate([ids, 300 + np.arange(30)])
    out = prid2011((fa, fb), ids, gb, (fb[:20], fa), ids, ids, metric="euclidean")
    for r in out.values():
        assert r.rank1 == 1.0 and r.mAP == pytest.approx(1.0)


def test_result_metrics_and_mean():
    r = ProtocolResult.from_cmc(np.array([0.5, 0.6, 0.7], np.float32), 0.4, None, 10)
    assert r.rank1 == pytest.approx(0.5) and r.rank5 == pytest.approx(0.7)
    m = r.as_metrics()
    assert set(m) == {"rank1", "rank5", "rank10", "mAP", "mINP"}
    assert math.isnan(m["mINP"])
    s = ProtocolResult.from_cmc(np.array([0.7, 0.8], np.float32), 0.2, 0.1, 6)
    avg = mean_result([r, s])
    np.testing.assert_allclose(avg.cmc, [0.6, 0.7])
    assert avg.mAP == pytest.approx(0.3) and avg.mINP is None and avg.num_valid == 16


def test_format_table_layout():
    a = ProtocolResult.from_cmc(np.linspace(0.424, 0.9, 20).astype(np.float32), 0.23, 0.05, 5)
    table = format_table({"Direct Transfer": a, "EDAAN": a})
    lines = table.splitlines()
    assert lines[0].split("|")[0].strip() == "Method"
    assert [c.strip() for c in lines[0].split("|")[1:]] == ["R-1", "R-5", "R-10", "mAP"]
    assert set(lines[1]) <= {"-", "+"}
    cells = [c.strip() for c in lines[2].split("|")]
    assert cells[0] == "Direct Transfer"
    assert cells[1] == f"{100 * a.rank1:.1f}" == "42.4"
    assert cells[4] == "23.0"
    assert len({len(line) for line in lines}) == 1  # aligned columns
    with pytest.raises(ValueError, match="unknown columns"):
        format_table({"x": a}, columns=("R-2",))


def test_nested_list_is_a_distmat_and_bad_feature_tuple_raises():
    d, qp, gp, qc, gc = _problem(10, num_q=6, num_g=30)
    a = market_duke(d.tolist(), qp, gp, qc, gc)
    b = market_duke(d, qp, gp, qc, gc)
    np.testing.assert_array_equal(a.cmc, b.cmc)
    with pytest.raises(ValueError, match="features must be a"):
        market_duke((d, d, d), qp, gp, qc, gc)
    with pytest.raises(ValueError, match="features must be a"):
        cuhk03_single_gallery_shot((d,), qp, gp, qc, gc)
