"""k-reciprocal re-ranking: the batched version against the per-probe float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edaan_fast.engine.reranking import _reference_re_ranking, re_ranking, re_ranking_features
from tests.conftest import DEVICES


def _blocks(seed, num_q=15, num_g=40, dim=4, ties=False):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(num_q + num_g, dim))
    if ties:
        f = np.round(f)  # integer points: many exactly equal distances (and duplicates)
    d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
    return f, d[:num_q, num_q:], d[:num_q, :num_q], d[num_q:, num_q:]


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (5, 3, 0.3), (4, 1, 0.5), (7, 10, 0.0)])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device, k1, k2, lam, ties):
    _, qg, qq, gg = _blocks(0, ties=ties)
    ref = _reference_re_ranking(qg, qq, gg, k1, k2, lam)
    out = re_ranking(*(torch.tensor(a, device=device) for a in (qg, qq, gg)), k1, k2, lam)
    assert out.shape == (15, 40) and out.dtype == torch.float64 and out.device.type == device
    torch.testing.assert_close(out.cpu(), torch.from_numpy(ref), atol=1e-10, rtol=0)


def test_chunking_does_not_change_the_result():
    _, qg, qq, gg = _blocks(1, ties=True)
    a = re_ranking(qg, qq, gg)
    b = re_ranking(qg, qq, gg, row_chunk=1, pair_budget=1)
    c = re_ranking(qg, qq, gg, row_chunk=6, pair_budget=37)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-12, rtol=0)


def test_problem_smaller_than_k():
    _, qg, qq, gg = _blocks(2, num_q=3, num_g=5)
    out = re_ranking(qg, qq, gg, k1=20, k2=6)
    torch.testing.assert_close(
        out, torch.from_numpy(_reference_re_ranking(qg, qq, gg)), atol=1e-10, rtol=0
    )


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
    from edaan_fast.engine.protocols import market_duke

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
    assert after.mAP > before.mAP


def test_input_errors():
    _, qg, qq, gg = _blocks(8)
    with pytest.raises(ValueError, match=r"re_ranking: expected q_q_dist \[15, 15\]"):
        re_ranking(qg, qq[:, :3], gg)
    with pytest.raises(ValueError, match="re_ranking: q_g_dist must be 2-D"):
        re_ranking(qg[0], qq, gg)
    with pytest.raises(ValueError, match="k1 and k2 must be >= 1"):
        re_ranking(qg, qq, gg, k1=0)
    with pytest.raises(ValueError, match=r"lambda_value must be in \[0, 1\]"):
        re_ranking(qg, qq, gg, lambda_value=1.5)
    bad = qg.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="contain NaN"):
        re_ranking(bad, qq, gg)
    with pytest.raises(ValueError, match="unknown metric 'l1'"):
        re_ranking_features(np.ones((2, 3)), np.ones((4, 3)), metric="l1")
    with pytest.raises(ValueError, match="dims differ"):
        re_ranking_features(np.ones((2, 3)), np.ones((4, 5)))
