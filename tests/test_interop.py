"""Interop: edaan_fast.ops.evaluate_rank in place of torchreid's / fast-reid's, through the
recipes of docs/evaluation.md (executed here against stand-in modules), and the light import of
edaan_fast.ops."""

from __future__ import annotations

import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from edaan_fast.metrics.protocols import cuhk03_single_gallery_shot
from edaan_fast.ops import evaluate_rank
from tests.conftest import requires_ops

DOC = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"


def recipe(name: str) -> str:
    """The python block that follows ``<!-- recipe: name -->`` in docs/evaluation.md."""
    text = DOC.read_text()
    m = re.search(rf"<!-- recipe: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert m, f"docs/evaluation.md has no recipe {name!r}"
    return m.group(1)


def market_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """torchreid's / fast-reid's eval_market1501 in numpy: (cmc, per-query AP, per-query INP)."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(num_q):
        order = indices[i]
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        raw = matches[i][keep]
        if not raw.any():
            continue
        cmc = raw.cumsum()
        last = np.max(np.where(raw == 1))
        all_inp.append(cmc[last] / (last + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        prec = raw.cumsum() / np.arange(1, len(raw) + 1.0)
        all_ap.append((prec * raw).sum() / raw.sum())
    cmc = np.asarray(all_cmc).astype(np.float32).sum(0) / len(all_cmc)
    return cmc, all_ap, all_inp


def problem(seed=0, num_q=30, num_g=120, ids=10):
    rng = np.random.default_rng(seed)
    return (rng.random((num_q, num_g)), rng.integers(0, ids, num_q), rng.integers(0, ids, num_g),
            rng.integers(0, 3, num_q), rng.integers(0, 3, num_g))


def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


@requires_ops
@pytest.mark.parametrize("as_tensor", [False, True])
def test_torchreid_signature_against_numpy(as_tensor):
    d, qp, gp, qc, gc = problem(1)
    ref_cmc, ref_ap, _ = market_reference(d, qp, gp, qc, gc, max_rank=20)
    args = [torch.from_numpy(a) for a in (d, qp, gp, qc, gc)] if as_tensor else [d, qp, gp, qc,
                                                                                   gc]
    cmc, mAP = evaluate_rank(*args, max_rank=20, use_metric_cuhk03=False, use_cython=True)
    assert isinstance(cmc, np.ndarray) and cmc.dtype == np.float32 and cmc.shape == (20,)
    assert isinstance(mAP, float)
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert mAP == pytest.approx(np.mean(ref_ap), abs=1e-9)


@requires_ops
def test_torchreid_recipe(monkeypatch):
    """The engine calls ``metrics.evaluate_rank(...)`` on ``torchreid.metrics``: patching the
    attribute reroutes it, with the same return values."""
    metrics = _module("torchreid.metrics",
                      evaluate_rank=lambda d, qp, gp, qc, gc, max_rank=50, **kw:
                      (market_reference(d, qp, gp, qc, gc, max_rank)[0],
                       float(np.mean(market_reference(d, qp, gp, qc, gc, max_rank)[1]))))
    torchreid = _module("torchreid", metrics=metrics)
    monkeypatch.setitem(sys.modules, "torchreid", torchreid)
    monkeypatch.setitem(sys.modules, "torchreid.metrics", metrics)

    def engine_evaluate(distmat, q_pids, g_pids, q_camids, g_camids):  # torchreid's Engine
        from torchreid import metrics as m

        return m.evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids,
                               use_metric_cuhk03=False)

    d, qp, gp, qc, gc = problem(2)
    before = engine_evaluate(d, qp, gp, qc, gc)
    exec(recipe("torchreid"), {})  # noqa: S102 - the documented recipe, run as written
    assert metrics.evaluate_rank is evaluate_rank
    after = engine_evaluate(d, qp, gp, qc, gc)
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    assert after[1] == pytest.approx(before[1], abs=1e-9)


@requires_ops
def test_torchreid_recipe_with_cuhk03(monkeypatch):
    metrics = _module("torchreid.metrics", evaluate_rank=None)
    monkeypatch.setitem(sys.modules, "torchreid", _module("torchreid", metrics=metrics))
    monkeypatch.setitem(sys.modules, "torchreid.metrics", metrics)
    exec(recipe("torchreid-cuhk03"), {})  # noqa: S102 - the documented recipe, run as written
    d, qp, gp, qc, gc = problem(3)
    cmc, mAP = metrics.evaluate_rank(d, qp, gp, qc, gc, max_rank=10)
    ref_cmc, ref_ap, _ = market_reference(d, qp, gp, qc, gc, max_rank=10)
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert mAP == pytest.approx(np.mean(ref_ap))
    cmc, mAP = metrics.evaluate_rank(d, qp, gp, qc, gc, max_rank=10, use_metric_cuhk03=True)
    sgs = cuhk03_single_gallery_shot(d, qp, gp, qc, gc, repeats=10, max_rank=10)
    np.testing.assert_array_equal(cmc, sgs.cmc)
    assert mAP == pytest.approx(np.mean(ref_ap))  # AP on the whole gallery, as torchreid


@requires_ops
def test_fastreid_recipe(monkeypatch):
    """fast-reid's ReidEvaluator imports ``evaluate_rank`` from ``fastreid.evaluation.rank``
    when it evaluates and expects ``(cmc, all_AP, all_INP)``."""
    rank = _module("fastreid.evaluation.rank",
                   evaluate_rank=lambda d, qp, gp, qc, gc, max_rank=50, **kw:
                   market_reference(d, qp, gp, qc, gc, max_rank))
    reid_evaluation = _module("fastreid.evaluation.reid_evaluation")
    evaluation = _module("fastreid.evaluation", rank=rank, reid_evaluation=reid_evaluation)
    fastreid = _module("fastreid", evaluation=evaluation)
    for name, mod in (("fastreid", fastreid), ("fastreid.evaluation", evaluation),
                      ("fastreid.evaluation.rank", rank),
                      ("fastreid.evaluation.reid_evaluation", reid_evaluation)):
        monkeypatch.setitem(sys.modules, name, mod)

    def reid_evaluator(dist, q_pids, g_pids, q_camids, g_camids):  # ReidEvaluator.evaluate
        from fastreid.evaluation.rank import evaluate_rank as fr_evaluate_rank

        cmc, all_ap, all_inp = fr_evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids)
        out = {f"Rank-{r}": cmc[r - 1] * 100 for r in (1, 5, 10)}
        out["mAP"], out["mINP"] = np.mean(all_ap) * 100, np.mean(all_inp) * 100
        out["metric"] = (np.mean(all_ap) + cmc[0]) / 2 * 100
        return out, len(all_ap)

    d, qp, gp, qc, gc = problem(4, num_q=40)
    d = d.astype(np.float32)
    before = reid_evaluator(d, qp, gp, qc, gc)
    exec(recipe("fast-reid"), {})  # noqa: S102 - the documented recipe, run as written
    after = reid_evaluator(d, qp, gp, qc, gc)
    assert after[1] == before[1]  # one AP per valid query
    for k, v in before[0].items():
        assert after[0][k] == pytest.approx(v, abs=1e-4), k
    assert reid_evaluation.evaluate_rank is rank.evaluate_rank


def test_import_ops_is_light():
    code = (
        "import sys, edaan_fast.ops\n"
        "heavy = ['matplotlib', 'nvidia.dali', 'edaan_fast.engine.trainer', 'edaan_fast.train',\n"
        "         'edaan_fast.evaluate', 'edaan_fast.data', 'edaan_fast.models', 'sklearn',\n"
        "         'torchvision']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
