"""Evaluator library: split extraction, protocols from features, re-ranking wiring, PRID2011
both ways, CUHK03 repeats, the features file round trip and the multi-query rank-list figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edaan_fast.data import Record
from edaan_fast.evaluation.evaluator import extract_split_features
from edaan_fast.evaluation.report import method_name
from edaan_fast.metrics.features import (
    FeatureMismatchError,
    Features,
    ReRanking,
    distance_matrix,
    evaluate_features,
    evaluate_prid2011,
    load_features,
    save_features,
)
from edaan_fast.metrics.reranking import _reference_re_ranking
from tests.conftest import requires_ops
from tests.oracles import market_loop


def _numpy_market(d, qp, gp, qc, gc):
    """torchreid's eval_market1501 (stable argsort), with mINP: the independent reference."""
    cmc, mAP, mINP, _ = market_loop(d, qp, gp, qc, gc, max_rank=50)
    return {"rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "mAP": mAP, "mINP": mINP}


def _assert_metrics(result, ref, tol=1e-6):
    got = result.as_metrics()
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=tol), k


def _clustered(seed, ids=12, per_id=6, dim=16, noise=0.8):
    """Features of ``ids`` identities (clusters), several cameras; split into query/gallery."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim)) * 1.5
    pids = np.repeat(np.arange(1, ids + 1), per_id)
    cams = np.tile(np.arange(per_id) % 3, ids)
    x = centres[pids - 1] + rng.normal(size=(len(pids), dim)) * noise
    is_q = np.tile(np.arange(per_id) == 0, ids)

    def feats(m):
        return Features(torch.tensor(x[m], dtype=torch.float32), torch.tensor(pids[m]),
                        torch.tensor(cams[m]), [f"img{i}.jpg" for i in np.nonzero(m)[0]])

    return feats(is_q), feats(~is_q)


def _sqdist(q, g):
    a, b = q.features.double().numpy(), g.features.double().numpy()
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


class _MeanColour(nn.Module):
    """A stand-in model: the feature of an image is its mean colour; counts images seen."""

    def __init__(self):
        super().__init__()
        self.seen = 0

    def extract_features(self, x):
        self.seen += x.shape[0]
        return x.mean(dim=(2, 3))


def test_extract_split_features_reads_shared_images_once(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (16, 8, 3), dtype=np.uint8)).save(p)
        records.append(Record(str(p), 100 + i % 3, i % 2))
    model = _MeanColour()
    out = extract_split_features(model, {"query": records[:4], "gallery": records, "other":
                                         records[5:]}, image_size=(16, 8), batch_size=3,
                                 num_workers=0)
    assert model.seen == 7  # CUHK03-style query = gallery: each image once
    assert out["query"].features.shape == (4, 3) and out["other"].features.shape == (2, 3)
    torch.testing.assert_close(out["query"].features, out["gallery"].features[:4])
    torch.testing.assert_close(out["other"].features, out["gallery"].features[5:])
    assert out["other"].pids.tolist() == [r.pid for r in records[5:]]
    assert out["gallery"].camids.tolist() == [r.camid for r in records]
    assert out["query"].paths == [r.path for r in records[:4]]
    # different colours give different features: the order is the records' order
    assert len({tuple(f.tolist()) for f in out["gallery"].features}) == 7


@requires_ops
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_market_protocol_matches_numpy(metric):
    q, g = _clustered(1)
    res = evaluate_features(q, g, "market", metric=metric)
    if metric == "euclidean":
        d = _sqdist(q, g)
    else:
        a = q.features.double().numpy()
        b = g.features.double().numpy()
        d = 1 - (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (
            b / np.linalg.norm(b, axis=1, keepdims=True)).T
    _assert_metrics(res, _numpy_market(d, q.pids.numpy(), g.pids.numpy(), q.camids.numpy(),
                                       g.camids.numpy()))
    assert 0.0 < res.mAP < 1.0  # a non-trivial problem


@requires_ops
def test_rerank_ranks_the_reranked_matrix_and_helps_on_clusters():
    q, g = _clustered(3, ids=15, per_id=8, noise=1.6)
    qp, gp, qc, gc = (t.numpy() for t in (q.pids, g.pids, q.camids, g.camids))
    rr = ReRanking(k1=6, k2=3, lambda_value=0.3)
    res = evaluate_features(q, g, "market", rerank=rr)
    # independent pipeline: float64 per-probe reference re-ranking of the euclidean distances
    qg, qq, gg = (np.sqrt(_sqdist(a, b)) for a, b in ((q, g), (q, q), (g, g)))
    ref = _reference_re_ranking(qg, qq, gg, k1=6, k2=3, lambda_value=0.3)
    _assert_metrics(res, _numpy_market(ref, qp, gp, qc, gc), tol=1e-5)
    plain = evaluate_features(q, g, "market")
    assert res.mAP > plain.mAP + 0.02  # k-reciprocal neighbours pull the clusters together
    d = distance_matrix(q, g, rerank=rr)
    np.testing.assert_allclose(d.double().numpy(), ref, atol=1e-5)
    # a matrix computed once (as for the figures) ranks to the same result
    assert evaluate_features(q, g, distmat=d).as_metrics() == res.as_metrics()
    with pytest.raises(FeatureMismatchError, match=r"distmat must be \[15, 105\]"):
        evaluate_features(q, g, distmat=d[:, :-1])


@requires_ops
def test_cuhk03_single_gallery_shot_averages_the_draws():
    # query i (pid i) sees two positives in the other camera: one at distance 0, one beyond
    # every negative (distance 100); negatives at distance 2. With one image drawn per identity,
    # rank-1 is a hit exactly when the near positive is drawn: probability 1/2 per draw.
    n = 40
    eye = torch.eye(n + 1)
    q = Features(eye[:n], torch.arange(n), torch.zeros(n, dtype=torch.int64))
    far = eye[:n] + 10 * eye[n]
    g = Features(torch.cat([eye[:n], far]), torch.arange(n).repeat(2),
                 torch.ones(2 * n, dtype=torch.int64))
    one = evaluate_features(q, g, "cuhk03", repeats=1, seed=0)
    ten = evaluate_features(q, g, "cuhk03", repeats=10, seed=0)
    many = evaluate_features(q, g, "cuhk03", repeats=50, seed=0)
    assert abs(ten.rank1 - 0.5) < 0.1 and abs(many.rank1 - 0.5) < 0.05
    assert ten.rank1 * 10 * n == pytest.approx(round(ten.rank1 * 10 * n))  # whole draws
    assert one.rank1 != ten.rank1
    assert len(ten.cmc) == n and ten.cmc[-1] == 1.0  # one drawn image per gallery identity
    # AP on the whole gallery: positives at ranks 0 and n (all n - 1 negatives between)
    assert ten.mAP == pytest.approx((1 + 2 / (n + 1)) / 2)
    assert evaluate_features(q, g, "cuhk03", repeats=10, seed=0).rank1 == ten.rank1
    # one gallery image per identity: every draw is the same, the market protocol's CMC
    g1 = Features(eye[:n].flip(0), torch.arange(n).flip(0), torch.ones(n, dtype=torch.int64))
    assert evaluate_features(q, g1, "cuhk03", repeats=7).rank1 == 1.0


@requires_ops
def test_prid2011_both_directions_and_mean():
    n, extra = 20, 5
    rng = np.random.default_rng(0)
    base = torch.tensor(rng.normal(size=(n + extra, 8)), dtype=torch.float32)
    pid = torch.arange(1, n + extra + 1)
    zeros = torch.zeros(n, dtype=torch.int64)
    # a2b: cam_a queries, cam_b gallery (the n shared persons + distractors): perfect matches
    a2b = (Features(base[:n], pid[:n], zeros),
           Features(base, pid, torch.ones(n + extra, dtype=torch.int64)))
    # b2a: the first half of the queries sit on another person's gallery image
    shifted = base[:n].clone()
    shifted[: n // 2] = base[1 : n // 2 + 1] + 1e-3
    b2a = (Features(shifted, pid[:n], torch.ones(n, dtype=torch.int64)),
           Features(base[:n], pid[:n], zeros))
    res = evaluate_prid2011(a2b, b2a)
    assert set(res) == {"a2b", "b2a", "mean"}
    assert res["a2b"].rank1 == 1.0 and res["a2b"].mAP == pytest.approx(1.0)
    ref = _numpy_market(_sqdist(*b2a), b2a[0].pids.numpy(), b2a[1].pids.numpy(),
                        b2a[0].camids.numpy(), b2a[1].camids.numpy())
    _assert_metrics(res["b2a"], ref)
    assert res["b2a"].rank1 == pytest.approx(0.5)
    assert res["mean"].rank1 == pytest.approx(0.75)
    assert res["mean"].mAP == pytest.approx((1.0 + ref["mAP"]) / 2)


def test_mismatched_features_are_refused():
    q = Features(torch.randn(5, 64), torch.arange(5), torch.zeros(5, dtype=torch.int64))
    g = Features(torch.randn(9, 32), torch.arange(9), torch.ones(9, dtype=torch.int64))
    with pytest.raises(FeatureMismatchError, match=r"\[5, 64\] but gallery.*\(64 vs 32\)"):
        evaluate_features(q, g)
    bad_ids = Features(torch.randn(9, 64), torch.arange(8), torch.ones(9, dtype=torch.int64))
    with pytest.raises(FeatureMismatchError, match="gallery pids must be 1-D with one entry"):
        evaluate_features(q, bad_ids)
    with pytest.raises(ValueError, match="use evaluate_prid2011"):
        evaluate_features(q, q, "prid2011")
    with pytest.raises(ValueError, match="lambda_value must be in"):
        ReRanking(lambda_value=1.5)


@requires_ops
def test_features_file_round_trip(tmp_path):
    q, g = _clustered(5)
    path = save_features(tmp_path / "f.npz", "cuhk03", "cuhk03", {"target": (q, g)},
                         {"method": "EDAAN"})
    assert path == tmp_path / "f.npz" and path.is_file()
    protocol, dataset, feats, meta = load_features(path)
    assert (protocol, dataset, meta) == ("cuhk03", "cuhk03", {"method": "EDAAN"})
    lq, lg = feats["target"]
    assert lq.paths == q.paths and torch.equal(lg.features, g.features)
    a = evaluate_features(q, g, "cuhk03", repeats=3)
    b = evaluate_features(lq, lg, protocol, repeats=3)
    assert a.as_metrics() == b.as_metrics()
    # PRID2011: both directions, prefixed
    save_features(tmp_path / "p.npz", "prid2011", "prid2011",
                  {"a2b": (q, g), "b2a": (g, q)}, {})
    protocol, _, feats, _ = load_features(tmp_path / "p.npz")
    assert protocol == "prid2011" and set(feats) == {"a2b", "b2a"}
    assert torch.equal(feats["b2a"][0].features, g.features)
    assert load_features(tmp_path / "p.npz", "prid2011")[0] == "prid2011"


def test_method_names_follow_the_paper():
    def name(**run):
        return method_name(run)

    assert name(variant="edaan", attention=True, metric_loss="quartet") == "EDAAN with Quartet"
    assert name(variant="edaan", attention=True, metric_loss="triplet") == "EDAAN with Triplet"
    assert name(variant="edaan", attention=False, metric_loss="quartet") == "EDAAN w/o attention"
    assert name(variant="daan", attention=True, metric_loss="quartet") == "DAAN with attention"
    assert name(variant="daan", attention=False, metric_loss="quartet") == "DAAN w/o attention"
    assert name(variant="cyclegan", attention=False, metric_loss="quartet") == "CycleGAN"
    assert name(variant="direct", attention=False, metric_loss="quartet") == "Direct Transfer"
    assert method_name({"variant": "edaan", "metric_loss": "quartet"}, no_attention=True) == \
        "EDAAN w/o attention"
    assert method_name({"variant": "edaan", "attention": True}, metric_loss=False) == "EDAAN"
    assert method_name({}) == "model"


def test_rank_lists_figure_layout(tmp_path):
    pytest.importorskip("matplotlib")
    from edaan_fast.viz import rank_lists_for_queries
    from edaan_fast.viz._canvas import GREEN, RED
    from edaan_fast.viz.rank_list import cell_origin

    g_pids = np.array([1, 2, 1, 3, 2, 1])
    g_cams = np.array([1, 1, 0, 1, 0, 1])
    q_pids, q_cams = np.array([1, 2]), np.array([0, 1])
    d = np.array([[0.5, 0.1, 0.0, 0.2, 0.3, 0.4],    # item 2: same pid & camera -> dropped
                  [0.1, 0.5, 0.2, 0.3, 0.0, 0.4]])   # item 1: dropped
    imgs = [np.full((16, 8, 3), 30 * i, np.uint8) for i in range(6)]
    path = rank_lists_for_queries(d, [1, 0], q_pids, q_cams, g_pids, g_cams, imgs[:2], imgs,
                                  tmp_path / "r.png", topk=3, size=(32, 16), row_gap=8)
    px = np.asarray(Image.open(path).convert("RGB"))
    row_h = 20 + 32 + 8
    assert px.shape == (2 * row_h + 8, 4 * 24 + 16 + 2 * 4, 3)

    def colour(row, i):
        y, x = cell_origin(i, (32, 16), 4, 20)
        return tuple(int(c) for c in px[row * (row_h + 8) + y + 2, x + 2])

    # query 1 (pid 2, cam 1): items 4 (pid 2, cam 0) ok, 0 wrong, 2 wrong
    assert [colour(0, i) for i in (1, 2, 3)] == [GREEN, RED, RED]
    # query 0 (pid 1, cam 0): items 1 wrong, 3 wrong, 4 wrong (item 2 dropped as junk)
    assert [colour(1, i) for i in (1, 2, 3)] == [RED, RED, RED]
