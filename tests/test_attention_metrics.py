"""Attention-quality metrics against hand-made maps with known scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edaan_fast.metrics import attention_quality, position_auc, roc_auc


def _person_masks(n=6, h=32, w=16, seed=0):
    """Soft-edged upright ellipses (a person-like blob) at random horizontal offsets."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    out = []
    for _ in range(n):
        cx = w / 2 + rng.uniform(-2, 2)
        d = ((xx - cx) / (0.25 * w)) ** 2 + ((yy - h / 2) / (0.4 * h)) ** 2
        out.append(np.clip((1.0 - d) * 4, 0, 1))
    return torch.tensor(np.stack(out)[:, None], dtype=torch.float32)


def test_perfect_map():
    masks = _person_masks()
    q = attention_quality(masks, masks)
    assert q.auc == pytest.approx(1.0, abs=1e-12)
    assert q.iou == pytest.approx(1.0, abs=1e-12)
    assert q.best_iou == pytest.approx(1.0, abs=1e-12)
    assert q.centre_contrast > 0.3 and q.spatial_std > 0.3


def test_inverted_map():
    masks = _person_masks()
    q = attention_quality(1.0 - masks, masks)
    assert q.auc == pytest.approx(0.0, abs=1e-12)
    assert q.iou < 0.05
    assert q.centre_contrast < -0.3


@pytest.mark.parametrize("level", [0.0, 0.39, 1.0])
def test_constant_map(level):
    masks = _person_masks()
    q = attention_quality(torch.full_like(masks, level), masks)
    assert q.auc == pytest.approx(0.5, abs=1e-12)  # ties count half: no ranking at all
    assert q.spatial_std == pytest.approx(0.0, abs=1e-12)
    assert q.centre_contrast == pytest.approx(0.0, abs=1e-12)
    assert q.mean == pytest.approx(level, abs=1e-6)
    person = float((masks > 0.5).float().mean())
    # all-ones predicts everything as person: IoU = person fraction; all-zeros: 0
    assert q.iou == pytest.approx(person if level > 0.5 else 0.0, abs=1e-9)


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(1)
    s = np.round(rng.random(300), 1)  # many ties
    y = rng.random(300) < 0.3
    pos, neg = s[y], s[~y]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert roc_auc(s, y) == pytest.approx(pairs, abs=1e-12)


def test_blurred_map_ranks_well_but_thresholds_worse():
    masks = _person_masks()
    soft = 0.2 + 0.3 * masks  # right shape, never above 0.5
    q = attention_quality(soft, masks)
    assert q.auc > 0.95
    assert q.iou == 0.0  # nothing above 0.5
    assert q.best_iou > 0.9 and q.best_t < 0.5


def test_proxies_without_masks():
    q = attention_quality(_person_masks())
    assert q.auc is None and q.iou is None and q.best_iou is None
    assert q.centre_contrast > 0.3


def test_bad_inputs():
    with pytest.raises(ValueError, match="masks must match"):
        attention_quality(torch.rand(2, 1, 8, 4), torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="maps must be"):
        attention_quality(torch.rand(2, 3, 8, 4))
    with pytest.raises(ValueError, match="needs both classes"):
        roc_auc(np.ones(5), np.ones(5, dtype=bool))
    with pytest.raises(ValueError, match="no attention maps"):
        attention_quality(torch.rand(0, 1, 8, 4))


def test_evaluate_attention_uses_masks_where_they_exist():
    """Synthetic images carry person masks (all fields); real images only the proxies."""
    from edaan_fast.data import build_dataset
    from edaan_fast.evaluation.evaluator import evaluate_attention
    from edaan_fast.models import build_model
    from tests.oracles import market_mini

    torch.manual_seed(0)
    model = build_model("tiny", num_ids=4)
    target = build_dataset("synthetic", domain="target", preset="tiny", seed=0)
    splits = {"A_T": target.query + target.gallery}
    root = market_mini()
    if root is not None:
        splits["A_S"] = build_dataset("market1501", root=root).query
    q = evaluate_attention(model, splits, image_size=(64, 32), max_images=40)
    assert q["A_T"].images == 40 and q["A_T"].auc is not None and 0 <= q["A_T"].iou <= 1
    if root is not None:
        assert q["A_S"].images == 40 and q["A_S"].auc is None and q["A_S"].iou is None
        assert 0 < q["A_S"].mean < 1


def test_position_auc_ignores_where_the_person_usually_is():
    masks = _person_masks()
    prior = masks.mean(dim=0, keepdim=True).expand_as(masks).contiguous()
    q = attention_quality(prior, masks)
    assert q.auc > 0.7  # position alone ranks the pixels well
    assert q.position_auc == pytest.approx(0.5, abs=1e-12)  # but reads nothing from the image
    assert attention_quality(masks, masks).position_auc == pytest.approx(1.0)
    assert attention_quality(1 - masks, masks).position_auc == pytest.approx(0.0)


def test_position_auc_matches_a_loop_over_positions():
    rng = np.random.default_rng(3)
    maps = torch.tensor(np.round(rng.random((40, 1, 6, 5)), 1))  # ties at every position
    masks = torch.tensor(rng.random((40, 1, 6, 5)) < 0.4, dtype=torch.float64)
    wins = pairs = 0.0
    for p in range(30):
        s, y = maps.flatten(1)[:, p].numpy(), masks.flatten(1)[:, p].numpy() > 0.5
        pos, neg = s[y], s[~y]
        wins += (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
        pairs += pos.size * neg.size
    assert position_auc(maps, masks, chunk=7) == pytest.approx(wins / pairs, abs=1e-12)
    everywhere_person = torch.ones(3, 1, 4, 4)
    assert position_auc(torch.rand(3, 1, 4, 4), everywhere_person) is None
