"""batch_hard_mining / triplet_loss / quartet_loss against the float64 reference."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from edaan_fast.losses import CrossEntropyLabelSmooth, QuartetLoss, TripletLoss
from edaan_fast.ops import (
    batch_hard_mining,
    quartet_loss,
    reference,
    triplet_loss,
    use_reference_ops,
)

from tests.conftest import (
    FLOAT_DTYPES, TOL, reduced_precision_float32_gemms, requires_cuda, requires_ops,
)

pytestmark = requires_ops

OPS = torch.ops.edaan_fast
KINDS = ["triplet", "soft_triplet", "quartet"]
METRICS = ["euclidean", "cosine"]


def _labels(B: int, ids: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, max(ids, 1), (B,), generator=gen)


def _fused(emb, labels, kind, metric, margin=0.3):
    if kind == "quartet":
        return quartet_loss(emb, labels, margin, metric)
    return triplet_loss(emb, labels, margin, metric, kind == "soft_triplet")


def _ref(emb, labels, kind, metric, margin=0.3):
    if kind == "quartet":
        return reference.quartet_loss(emb, labels, margin, metric)
    return reference.triplet_loss(emb, labels, margin, metric, kind == "soft_triplet")


def _ref_indices(emb64, labels, metric, kind):
    """(p, n, m) as the fused forward saves them (m only where the quartet term is used)."""
    p, n, m = reference._mine_indices(reference.pairwise_distance(emb64, metric), labels)
    has_q = (p >= 0) & (n >= 0) & (m >= 0) & (kind == "quartet")
    return torch.stack([p, n, torch.where(has_q, m, torch.full_like(m, -1))], dim=1)


def _check_against_reference(emb, labels, kind, metric, tol, check_idx=True, grad_tol=None):
    """Loss within ``tol`` of the float64 reference on the same (rounded) inputs, gradient
    within ``grad_tol`` (default ``tol``), and the same picks."""
    emb = emb.detach().requires_grad_(True)
    loss = _fused(emb, labels, kind, metric)
    (grad,) = torch.autograd.grad(loss, emb)
    emb64 = emb.detach().cpu().double().requires_grad_(True)
    loss_ref = _ref(emb64, labels.cpu(), kind, metric)
    (grad_ref,) = torch.autograd.grad(loss_ref, emb64)
    acc = torch.float64 if emb.dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and loss.dim() == 0
    assert grad.dtype == emb.dtype and grad.shape == emb.shape
    torch.testing.assert_close(loss.cpu().double(), loss_ref, **tol)
    torch.testing.assert_close(grad.cpu().double(), grad_ref, **(grad_tol or tol))
    if check_idx:
        _, idx, _, _ = OPS._metric_loss_forward(emb.detach(), labels, 0.3, metric, kind)
        assert torch.equal(idx.cpu(), _ref_indices(emb64.detach(), labels.cpu(), metric, kind))


# ---- batch_hard_mining -------------------------------------------------------------------------


@pytest.mark.parametrize("B", [0, 1, 2, 8, 64, 256])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_mining_matches_reference(device, dtype, B, gen):
    labels = _labels(B, max(B // 4, 1), gen).to(device)
    for ties in (False, True):
        if ties:  # integer distances: many exact ties, resolved to the lowest index
            dist = torch.randint(0, 4, (B, B), generator=gen).to(dtype)
        else:
            dist = torch.rand(B, B, generator=gen).to(dtype)
        dist = dist.to(device)
        out = batch_hard_mining(dist, labels)
        ref = reference.batch_hard_mining(dist.cpu().double(), labels.cpu())
        assert [t.dtype for t in out] == [dtype] * 3 + [torch.int64] * 3 + [torch.int8]
        for got, want in zip(out, ref):
            assert got.shape == (B,)
            assert torch.equal(got.cpu().to(want.dtype), want)


def test_mining_semantics_by_hand():
    # Anchor 0 (id 0): positives 1 (d 2), 2 (d 2) -> the tie goes to 1; negatives 3 (id 1, d 1),
    # 4 (id 2, d 1) -> 3; second negative: closest to 3 among ids not in {0, 1}: 4 or 5 (id 2,
    # both d 5 from 3) -> 4.
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    dist = torch.full((6, 6), 9.0)
    dist.fill_diagonal_(0)
    dist[0, 1] = dist[0, 2] = 2
    dist[0, 3] = dist[0, 4] = 1
    dist[3, 4] = dist[3, 5] = 5
    d_ap, d_an, d_mn, p, n, m, valid = batch_hard_mining(dist, labels)
    assert (p[0].item(), n[0].item(), m[0].item(), valid[0].item()) == (1, 3, 4, 2)
    assert (d_ap[0].item(), d_an[0].item(), d_mn[0].item()) == (2.0, 1.0, 5.0)
    # Anchor 3 (id 1) has no positive: no term, but n and m are still reported.
    assert p[3].item() == -1 and valid[3].item() == 0 and d_ap[3].item() == 0


def test_mining_nan_wins_like_torch_max():
    labels = torch.tensor([0, 0, 0, 1, 1])
    dist = torch.rand(5, 5)
    dist[0, 2] = float("nan")
    dist[0, 4] = float("nan")
    out = batch_hard_mining(dist, labels)
    ref = reference.batch_hard_mining(dist, labels)
    assert out[3][0].item() == 2 and out[4][0].item() == 4
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


# ---- losses against the reference --------------------------------------------------------------

# (B, D): every B with a small D; the big dims on a few batch sizes only.
SHAPES = [(1, 3), (2, 3), (8, 3), (64, 3), (256, 3), (8, 128), (64, 128), (256, 128), (64, 2048)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("B,D", SHAPES)
def test_loss_matches_reference_float64(device, B, D, metric, kind, gen):
    emb = torch.randn(B, D, generator=gen, dtype=torch.float64).to(device)
    labels = _labels(B, max(B // 4, 2), gen).to(device)
    _check_against_reference(emb, labels, kind, metric, TOL[torch.float64])


# The gradient of a float16/bfloat16 input is computed in float32 and rounded once to the
# input's dtype: within one unit of that rounding of the float64 value (rtol: the dtype's
# epsilon; atol: float16's subnormal step 2**-24, and float32 round-off of bfloat16's tiny
# values). An accumulation in the low precision is off by many units.
GRAD_TOL = {
    torch.float32: TOL[torch.float32],
    torch.float16: dict(rtol=2.0**-10, atol=2.0**-24),
    torch.bfloat16: dict(rtol=2.0**-7, atol=1e-8),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metric", METRICS)
def test_loss_matches_reference_low_precision(device, dtype, metric, kind, gen):
    for B, D in [(8, 3), (64, 128)]:
        emb = torch.randn(B, D, generator=gen).to(dtype).to(device)
        labels = _labels(B, B // 4, gen).to(device)
        # The op computes in float32 on the rounded input: the loss (float32) is compared with
        # the float64 reference on the same rounded values at the float32 tolerance, whatever
        # the input's dtype; the gradient within one rounding to the input's dtype.
        _check_against_reference(emb, labels, kind, metric, TOL[torch.float32],
                                 grad_tol=GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_low_precision_large_dim_accumulates_in_float32(device, dtype, metric, gen):
    """2048 entries of size ~6 per row: squared norms ~ 2048 * 36 = 73,728 and squared
    distances ~ 147,000, past float16's largest value (65,504), and a sum of 2048 squares in
    bfloat16 (8 significant bits) drifts by percents. Accumulated in float32, the loss stays
    within float32 rounding of the float64 reference on the same rounded values."""
    B = 64
    emb = (torch.randn(B, 2048, generator=gen) * 6).to(dtype).to(device)
    labels = (torch.arange(B) // 4).to(device)
    assert torch.isfinite(emb).all() and emb.float().square().sum(1).min() > 65504
    _check_against_reference(emb, labels, "quartet", metric, TOL[torch.float32],
                             grad_tol=GRAD_TOL[dtype])


@pytest.mark.parametrize("metric", METRICS)
def test_loss_large(device, metric, gen):
    B, D = 256, 2048
    emb = torch.randn(B, D, generator=gen).to(device)
    labels = (torch.arange(B) // 4).to(device)  # P x K = 64 x 4, as a PK sampler gives
    _check_against_reference(emb, labels, "quartet", metric, dict(atol=1e-5, rtol=1e-4))


@pytest.mark.parametrize("kind", KINDS)
def test_ties_integer_embeddings(device, kind, gen):
    # Integer-valued embeddings with repeated rows: exact, tied distances; every backend must
    # pick the lowest index, as the reference does.
    base = torch.randint(-2, 3, (12, 6), generator=gen)
    emb = base[torch.randint(0, 12, (64,), generator=gen)].to(torch.float32).to(device)
    labels = _labels(64, 6, gen).to(device)
    for dtype in (torch.float32, torch.float64):
        _check_against_reference(emb.to(dtype), labels, kind, "euclidean", TOL[dtype])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", KINDS)
def test_all_equal_embeddings_no_nan(device, metric, kind, gen):
    emb = torch.randn(1, 16, generator=gen, dtype=torch.float64).expand(8, 16).contiguous()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device=device)
    emb = emb.to(device).requires_grad_(True)
    loss = _fused(emb, labels, kind, metric)
    (grad,) = torch.autograd.grad(loss, emb)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    if metric == "euclidean":  # exact zero distances: exact ties and a zero gradient
        _check_against_reference(emb, labels, kind, metric, TOL[torch.float64])
        assert torch.equal(grad, torch.zeros_like(grad))
        if kind != "soft_triplet":
            assert loss.item() == pytest.approx(0.3, abs=1e-5)  # 0 - 0 + margin


# ---- hand values and peer libraries --------------------------------------------------------------
#
# Six points in 2-D, identities 0, 0, 1, 1, 2, 2, margin 0.3. Per anchor: p the hardest positive,
# n the hardest negative, m the closest point to n from the third identity;
# triplet = max(d_ap - d_an + 0.3, 0), soft = softplus(d_ap - d_an),
# quartet = max(d_ap - d_an + d_ap - d_mn + 0.3, 0) (EDAAN eq. 6/7).
#
# euclidean: x0 = (2, 2), x1 = (1, 3) | x2 = (2, 1), x3 = (0, 0) | x4 = (0, 3), x5 = (3, 3)
#   d01 = √2, d02 = 1, d03 = √8, d04 = √5, d05 = √2, d12 = √5, d13 = √10, d14 = 1, d15 = 2,
#   d23 = √5, d24 = √8, d25 = √5, d34 = 3, d35 = √18, d45 = 3
#   (√2 = 1.414214, √5 = 2.236068, √8 = 2.828427)
#   i  p n m  d_ap d_an d_mn  triplet           soft               quartet
#   0  1 2 5  √2   1    √5    √2 - 1 + .3       sp(0.414214)       2√2 - 1 - √5 + .3
#                             = 0.714214        = 0.921549         = -0.107641 -> 0
#   1  0 4 2  √2   1    √8    0.714214          0.921549           2√2 - 1 - √8 + .3 = -0.7 -> 0
#   2  3 0 5  √5   1    √2    √5 - 1 + .3       sp(1.236068)       2√5 - 1 - √2 + .3
#                             = 1.536068        = 1.491117         = 2.357922
#   3  2 0 5  √5   √8   √2    √5 - √8 + .3      sp(-0.592359)      2√5 - √8 - √2 + .3
#                             = -0.292359 -> 0  = 0.440202         = 0.529495
#   4  5 1 2  3    1    √5    3 - 1 + .3 = 2.3  sp(2) = 2.126928   6 - 1 - √5 + .3 = 3.063932
#   5  4 0 2  3    √2   1     3 - √2 + .3       sp(1.585786)       6 - √2 - 1 + .3
#                             = 1.885786        = 1.772089         = 3.885786
#   means over 6: triplet 7.150282 / 6 = 1.191714, soft 7.673434 / 6 = 1.278906,
#   quartet 9.837135 / 6 = 1.639523
#
# cosine (1 - cos): x0 = (3, 4), x1 = (1, 0) | x2 = (12, 5), x3 = (-4, 3) | x4 = (0, 1),
#   x5 = (-3, 4); unit vectors (.6, .8), (1, 0), (12, 5) / 13, (-.8, .6), (0, 1), (-.6, .8)
#   d01 = .4, d02 = 1 - 11.2/13 = 1.8/13, d03 = 1, d04 = .2, d05 = 1 - .28 = .72, d12 = 1/13,
#   d13 = 1.8, d14 = 1, d15 = 1.6, d23 = 1 + 6.6/13 = 19.6/13, d24 = 8/13,
#   d25 = 1 + 3.2/13 = 16.2/13, d34 = .4, d35 = 1 - .96 = .04, d45 = .2
#   i  p n m  d_ap     d_an    d_mn    triplet                 quartet
#   0  1 2 4  .4       1.8/13  8/13    .7 - 1.8/13 = 0.561538  1.1 - 9.8/13 = 0.346154
#   1  0 2 4  .4       1/13    8/13    .7 - 1/13 = 0.623077    1.1 - 9/13 = 0.407692
#   2  3 1 4  19.6/13  1/13    1       18.6/13 + .3 = 1.730769 38.2/13 - .7 = 2.238462
#   3  2 5 0  19.6/13  .04     .72     1.767692                39.2/13 - .46 = 2.555385
#   4  5 0 2  .2       .2      1.8/13  .3                      .7 - 1.8/13 = 0.361538
#   5  4 3 0  .2       .04     1       .46                     .4 - 1.04 + .3 < 0 -> 0
#   means: triplet 5.443077 / 6 = 1769/1950 = 0.907179, quartet 5.909231 / 6 = 3841/3900
#   = 0.984872; soft: sp(d_ap - d_an) = 0.832442, 0.867677, 1.645175, 1.675078, 0.693147,
#   0.776344, mean 6.489862 / 6 = 1.081644
HAND_LABELS = [0, 0, 1, 1, 2, 2]
HAND = {
    "euclidean": dict(
        emb=[[2, 2], [1, 3], [2, 1], [0, 0], [0, 3], [3, 3]],
        idx=[[1, 2, 5], [0, 4, 2], [3, 0, 5], [2, 0, 5], [5, 1, 2], [4, 0, 2]],
        loss={"triplet": 1.191714, "soft_triplet": 1.278906, "quartet": 1.639523},
    ),
    "cosine": dict(
        emb=[[3, 4], [1, 0], [12, 5], [-4, 3], [0, 1], [-3, 4]],
        idx=[[1, 2, 4], [0, 2, 4], [3, 1, 4], [2, 5, 0], [5, 0, 2], [4, 3, 0]],
        loss={"triplet": 0.907179, "soft_triplet": 1.081644, "quartet": 0.984872},
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metric", METRICS)
def test_loss_hand_values(device, metric, kind, dtype):
    case = HAND[metric]
    emb = torch.tensor(case["emb"], dtype=dtype, device=device)
    labels = torch.tensor(HAND_LABELS, device=device)
    loss = _fused(emb, labels, kind, metric)
    assert loss.item() == pytest.approx(case["loss"][kind], abs=1e-6)
    idx = torch.tensor(case["idx"])
    if kind != "quartet":
        idx[:, 2] = -1  # m is kept only where the quartet term uses it
    assert torch.equal(OPS._metric_loss_forward(emb, labels, 0.3, metric, kind)[1].cpu(), idx)
    *_, p, n, m, valid = batch_hard_mining(reference.pairwise_distance(emb, metric), labels)
    assert torch.equal(torch.stack([p, n, m], 1).cpu(), torch.tensor(case["idx"]))
    assert valid.tolist() == [2] * 6


def _pml_triplet_loss(metric: str, soft_margin: bool, margin: float = 0.3):
    """pytorch-metric-learning's ``TripletMarginLoss`` on ``BatchHardMiner`` triplets, set up to
    compute what ``triplet_loss`` computes: un-normalised euclidean distances (its LpDistance
    normalises by default) or cosine similarity; the soft margin as ``smooth_loss`` with margin
    0 (it takes softplus of ``d_ap - d_an + margin``); and a ``MeanReducer`` (its default
    ``AvgNonZeroReducer`` divides by the number of non-zero terms, not by the number of anchors
    with a positive and a negative)."""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses, miners, reducers

    distance = (distances.LpDistance(normalize_embeddings=False, p=2, power=1)
                if metric == "euclidean" else distances.CosineSimilarity())
    miner = miners.BatchHardMiner(distance=distance)
    loss_fn = losses.TripletMarginLoss(margin=0.0 if soft_margin else margin, distance=distance,
                                       smooth_loss=soft_margin, reducer=reducers.MeanReducer())
    return lambda emb, labels: loss_fn(emb, labels, miner(emb, labels))


@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("metric", METRICS)
def test_triplet_matches_pytorch_metric_learning(metric, soft_margin, gen):
    peer = _pml_triplet_loss(metric, soft_margin)
    hand = HAND[metric]
    emb = torch.tensor(hand["emb"], dtype=torch.float64)
    labels = torch.tensor(HAND_LABELS)
    kind = "soft_triplet" if soft_margin else "triplet"
    assert peer(emb, labels).item() == pytest.approx(hand["loss"][kind], abs=1e-6)
    # random float64 batch with singletons (no term in either library) and unequal group sizes
    emb = torch.randn(48, 16, generator=gen, dtype=torch.float64)
    labels = _labels(48, 14, gen)
    x, y = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    ours = triplet_loss(x, labels, 0.3, metric, soft_margin)
    theirs = peer(y, labels)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-10)


def _torchreid_triplet_loss():
    pytest.importorskip("torchreid")
    try:
        from torchreid.losses import TripletLoss
    except ImportError:  # torchreid >= 1.4 keeps the re-ID code under torchreid.reid
        from torchreid.reid.losses import TripletLoss
    return TripletLoss(margin=0.3)


def test_triplet_matches_torchreid(gen):
    """torchreid's ``TripletLoss`` (batch-hard, euclidean, mean over all anchors) equals ours
    on a PK batch, where every anchor has a positive and a negative."""
    peer = _torchreid_triplet_loss()
    emb = torch.randn(32, 16, generator=gen, dtype=torch.float64)
    labels = torch.arange(32) // 4
    x, y = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    ours = triplet_loss(x, labels, 0.3)
    theirs = peer(y, labels)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-10)


# ---- edge cases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "labels",
    [[], [7], [3, 3, 3, 3, 3], [0, 1, 2, 3, 4]],
    ids=["empty", "one", "one_identity", "singletons"],
)
def test_no_valid_anchor_gives_zero(device, kind, labels, gen):
    labels = torch.tensor(labels, dtype=torch.int64, device=device)
    emb = torch.randn(len(labels), 5, generator=gen).to(device).requires_grad_(True)
    loss = _fused(emb, labels, kind, "euclidean")
    (grad,) = torch.autograd.grad(loss, emb)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))
    valid = batch_hard_mining(torch.cdist(emb.detach(), emb.detach()), labels)[6]
    assert (valid == 0).all()


def test_two_identities_quartet_falls_back_to_triplet(device, gen):
    emb = torch.randn(10, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    labels = torch.tensor([0, 1] * 5, device=device)
    q = quartet_loss(emb, labels)
    t = triplet_loss(emb, labels)
    torch.testing.assert_close(q, t, rtol=0, atol=0)
    out = batch_hard_mining(reference.pairwise_distance(emb.detach()), labels)
    assert (out[5] == -1).all() and (out[6] == 1).all()
    _check_against_reference(emb, labels, "quartet", "euclidean", TOL[torch.float64])


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_embeddings_propagate(device, kind, bad, gen):
    emb = torch.randn(8, 4, generator=gen).to(device)
    emb[3, 1] = float(bad)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device=device)
    emb.requires_grad_(True)
    loss = _fused(emb, labels, kind, "euclidean")
    ref = _ref(emb.detach().cpu().double(), labels.cpu(), kind, "euclidean")
    assert torch.isnan(loss) and torch.isnan(ref)
    (grad,) = torch.autograd.grad(loss, emb)
    assert not torch.isfinite(grad).all()


# ---- input checks --------------------------------------------------------------------------------


def test_errors():
    emb = torch.randn(4, 3)
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(RuntimeError, match=r"quartet_loss.*|_metric_loss_forward: labels must be int64 \[4\].*Int"):
        quartet_loss(emb, labels.int())
    with pytest.raises(RuntimeError, match=r"_metric_loss_forward: labels must be int64 \[4\].*\[3\]"):
        triplet_loss(emb, labels[:3])
    with pytest.raises(RuntimeError, match=r"_metric_loss_forward: emb must be a 2-D \[B, D\] tensor, got 1-D"):
        triplet_loss(emb[0], labels[:1])
    with pytest.raises(RuntimeError, match=r"_metric_loss_forward: emb must be floating point.*Long"):
        triplet_loss(emb.long(), labels)
    with pytest.raises(RuntimeError, match=r"_metric_loss_forward: margin must be finite, got inf"):
        triplet_loss(emb, labels, margin=float("inf"))
    with pytest.raises(RuntimeError, match=r"_metric_loss_forward: metric must be \"euclidean\" or \"cosine\", got \"l1\""):
        OPS.triplet_loss(emb, labels, 0.3, "l1")
    with pytest.raises(ValueError, match=r"quartet_loss: metric must be one of"):
        quartet_loss(emb, labels, metric="l1")
    with pytest.raises(RuntimeError, match=r"_metric_loss_forward: loss must be \"triplet\""):
        OPS._metric_loss_forward(emb, labels, 0.3, "euclidean", "pair")
    with pytest.raises(RuntimeError, match=r"batch_hard_mining: dist must be a square 2-D \[B, B\] tensor, got \[4, 3\]"):
        batch_hard_mining(emb, labels)
    with pytest.raises(RuntimeError, match=r"batch_hard_mining: dist must be floating point.*Long"):
        batch_hard_mining(torch.zeros(4, 4, dtype=torch.long), labels)
    with pytest.raises(RuntimeError, match=r"batch_hard_mining: labels must be int64 \[4\].*Float"):
        batch_hard_mining(torch.rand(4, 4), labels.float())
    idx = torch.zeros(4, 3, dtype=torch.long)
    pd = torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match=r"_metric_loss_backward: idx must be int64 \[4, 3\]"):
        OPS._metric_loss_backward(torch.ones(()), emb, idx[:2], pd, pd, "euclidean")
    with pytest.raises(RuntimeError, match=r"_metric_loss_backward: pair_dist and coef must be floating \[4, 3\]"):
        OPS._metric_loss_backward(torch.ones(()), emb, idx, pd[:, :2], pd, "euclidean")
    with pytest.raises(RuntimeError, match=r"_metric_loss_backward: grad must hold one value"):
        OPS._metric_loss_backward(torch.ones(2), emb, idx, pd, pd, "euclidean")


@requires_cuda
def test_errors_device_mismatch():
    with pytest.raises(RuntimeError, match=r"labels must be on the device of emb"):
        triplet_loss(torch.randn(4, 3, device="cuda"), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(RuntimeError, match=r"labels must be on the device of dist"):
        batch_hard_mining(torch.rand(4, 4, device="cuda"), torch.tensor([0, 0, 1, 1]))


# ---- autograd, opcheck, compile ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck(device, metric, kind, gen):
    emb = torch.randn(10, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 4], device=device)
    assert torch.autograd.gradcheck(lambda e: _fused(e, labels, kind, metric), (emb,))


def test_backward_has_no_gemm(gen):
    # The backward is a sparse scatter over the selected pairs: no mm/addmm, unlike autograd
    # through the [B, B] distance matrix.
    emb = torch.randn(32, 16, generator=gen, requires_grad=True)
    labels = torch.arange(32) // 4
    loss = quartet_loss(emb, labels)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    names = {e.name for e in prof.events()}
    assert "edaan_fast::_metric_loss_backward" in names
    assert not names & {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"}


@pytest.mark.parametrize("metric", METRICS)
def test_opcheck(device, metric, gen):
    emb = torch.randn(12, 6, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    labels = (torch.arange(12) // 3).to(device)
    dist = reference.pairwise_distance(emb.detach(), metric)
    torch.library.opcheck(OPS.batch_hard_mining.default, (dist, labels))
    torch.library.opcheck(OPS.triplet_loss.default, (emb, labels, 0.3, metric, False))
    torch.library.opcheck(OPS.triplet_loss.default, (emb, labels, 0.3, metric, True))
    torch.library.opcheck(OPS.quartet_loss.default, (emb, labels, 0.2, metric))
    torch.library.opcheck(OPS._metric_loss_forward.default, (emb, labels, 0.3, metric, "quartet"))
    _, idx, pd, coef = OPS._metric_loss_forward(emb.detach(), labels, 0.3, metric, "quartet")
    torch.library.opcheck(
        OPS._metric_loss_backward.default,
        (torch.ones((), dtype=torch.float64, device=device), emb.detach(), idx, pd, coef, metric),
    )


def test_compile_fullgraph(device, gen):
    emb = torch.randn(16, 8, generator=gen).to(device)
    labels = (torch.arange(16) // 4).to(device)

    def fn(e, y):
        d = torch.cdist(e, e)
        mined = batch_hard_mining(d, y)
        return quartet_loss(e, y) + triplet_loss(e, y, 0.2, "cosine", True), mined[3]

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    e1 = emb.clone().requires_grad_(True)
    e2 = emb.clone().requires_grad_(True)
    l1, p1 = fn(e1, labels)
    l2, p2 = compiled(e2, labels)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l2, l1)
    assert torch.equal(p1, p2)
    torch.testing.assert_close(e2.grad, e1.grad)


def test_compile_inductor(gen):
    """The default backend (inductor) lowers the ops as extern kernels next to its own generated
    code, forward and backward: the fake (meta) functions must give what the kernels give."""
    emb = torch.randn(16, 8, generator=gen)
    labels = torch.arange(16) // 4

    def fn(e, y):
        return quartet_loss(e, y) + 2 * triplet_loss(e, y, 0.2, "cosine", True)

    compiled = torch.compile(fn, fullgraph=True)
    e1 = emb.clone().requires_grad_(True)
    e2 = emb.clone().requires_grad_(True)
    l1 = fn(e1, labels)
    l2 = compiled(e2, labels)
    l1.backward()
    l2.backward()
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(e2.grad, e1.grad)
    want = reference.quartet_loss(emb, labels) + 2 * reference.triplet_loss(
        emb, labels, 0.2, "cosine", True)
    torch.testing.assert_close(l2, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,D", [(16, 32), (192, 320)])  # (192, 320): the blocked Gram path
def test_autocast(device, kind, B, D, gen):
    """Under autocast the op sees the embeddings as they come (a bfloat16/float16 Linear
    output) and computes in float32, as outside autocast; backward inside the context too."""
    device_type = torch.device(device).type
    amp_dtype = torch.bfloat16 if device_type == "cpu" else torch.float16
    lin = torch.nn.Linear(D, D).to(device)
    x = torch.randn(B, D, generator=gen).to(device)
    labels = (torch.arange(B) // 4).to(device)
    with torch.autocast(device_type, dtype=amp_dtype):
        emb = lin(x)
        assert emb.dtype == amp_dtype
        loss = _fused(emb, labels, kind, "euclidean")
        (grad,) = torch.autograd.grad(loss, emb)
    assert loss.dtype == torch.float32 and grad.dtype == amp_dtype
    emb64 = emb.detach().double().cpu().requires_grad_(True)
    loss_ref = _ref(emb64, labels.cpu(), kind, "euclidean")
    (grad_ref,) = torch.autograd.grad(loss_ref, emb64)
    torch.testing.assert_close(loss.double().cpu(), loss_ref, **TOL[torch.float32])
    torch.testing.assert_close(grad.double().cpu(), grad_ref, **TOL[amp_dtype])


# ---- backends, modules, reference switch ---------------------------------------------------------


def _clear_anchors(emb: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
                   metric: str, gap: float = 1e-4) -> torch.Tensor:
    """Anchors whose picks (p, n, m) beat every rival by more than ``gap`` in float64: on the
    others, an ulp of FMA contraction or GEMM rounding may rightly pick another index."""
    x = emb.double()
    d = reference.pairwise_distance(x, metric)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    ok = torch.ones(len(labels), dtype=torch.bool)
    for i in range(len(labels)):
        p, n, m = idx[i].tolist()
        pos, neg = d[i][same[i] & ~eye[i]], d[i][~same[i]]
        if p >= 0 and (pos > d[i, p] - gap).sum() > 1:
            ok[i] = False
        if n >= 0 and (neg < d[i, n] + gap).sum() > 1:
            ok[i] = False
        if m >= 0:
            third = d[n][(labels != labels[i]) & (labels != labels[n])]
            if (third < d[n, m] + gap).sum() > 1:
                ok[i] = False
    return ok


@requires_cuda
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_cuda_same_indices(metric, kind, gen):
    # euclidean on small integers: the Gram matrix and every distance are exact on both
    # backends, so even the many exact ties must break alike; cosine (never exact): random
    # rows, compared where no rival is within rounding of a pick
    emb = (torch.randint(-8, 9, (256, 128), generator=gen).float() if metric == "euclidean"
           else torch.randn(256, 128, generator=gen))
    labels = _labels(256, 64, gen)
    cpu = OPS._metric_loss_forward(emb, labels, 0.3, metric, kind)
    gpu = OPS._metric_loss_forward(emb.cuda(), labels.cuda(), 0.3, metric, kind)
    if metric == "euclidean":
        assert torch.equal(cpu[1], gpu[1].cpu())
    else:
        ok = _clear_anchors(emb, labels, cpu[1], metric)
        assert ok.sum() > 200
        assert torch.equal(cpu[1][ok], gpu[1].cpu()[ok])
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], **TOL[torch.float32])
    dist = torch.randint(0, 4, (100, 100), generator=gen).float()
    labels = _labels(100, 20, gen)
    for a, b in zip(batch_hard_mining(dist, labels), batch_hard_mining(dist.cuda(), labels.cuda())):
        assert torch.equal(a, b.cpu())


def _hub_batch(B: int, D: int, gen: torch.Generator):
    """A batch whose sample 0 is every other identity's hardest negative (and the second
    negative of many): its gradient row sums hundreds of pair contributions."""
    labels = torch.arange(B) // 4
    centre = torch.randn(D, generator=gen) * 2
    emb = centre + torch.randn(B, D, generator=gen)
    emb[0] = centre  # |noise| from everyone, where other pairs are ~sqrt(2) |noise| apart
    return emb, labels


@pytest.mark.parametrize("metric", METRICS)
def test_backward_bit_identical_across_runs(device, metric, gen):
    emb, labels = _hub_batch(256, 64, gen)
    emb, labels = emb.to(device), labels.to(device)
    grads = []
    for _ in range(2):
        x = emb.clone().requires_grad_()
        quartet_loss(x, labels, 0.3, metric).backward()
        grads.append(x.grad)
    idx = OPS._metric_loss_forward(emb, labels, 0.3, metric, "quartet")[1]
    assert (idx[:, 1] == 0).sum() > 100  # the hub row is hit by > 100 pairs
    assert torch.equal(grads[0], grads[1])
    x64 = emb.double().requires_grad_()
    reference.quartet_loss(x64, labels, 0.3, metric).backward()
    torch.testing.assert_close(grads[0].double(), x64.grad, atol=1e-5, rtol=1e-4)


def test_backward_under_deterministic_algorithms(device, gen):
    emb, labels = _hub_batch(64, 32, gen)
    x = emb.to(device).requires_grad_()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        quartet_loss(x, labels.to(device)).backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("metric", METRICS)
def test_reduced_precision_float32_gemms_do_not_change_the_loss(device, metric, gen):
    """torch.set_float32_matmul_precision("medium") (TF32 on CUDA, bfloat16 in oneDNN on a
    CPU that has it) must not reach the Gram matrix: same picks, same loss."""
    B = 256
    labels = torch.arange(B) // 4
    emb = (torch.randn(B, 2048, generator=gen) * 0.5 + 3).to(device)  # |x|^2 >> distances
    labels = labels.to(device)
    want = OPS._metric_loss_forward(emb, labels, 0.3, metric, "quartet")
    with reduced_precision_float32_gemms(device):
        got = OPS._metric_loss_forward(emb, labels, 0.3, metric, "quartet")
    # same picks; the loss within float32 rounding of the Gram matrix (bfloat16 products
    # moved it by 5e-4 and changed 5 picks of such a batch)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=5e-5)


@requires_cuda
@pytest.mark.parametrize("B", [1027, 4096])
@pytest.mark.parametrize("metric", METRICS)
def test_cuda_large_batches_match_cpu(B, metric, gen):
    labels = torch.arange(B) // 4
    emb = (torch.randint(-8, 9, (B, 128), generator=gen).float() if metric == "euclidean"
           else torch.randn(B, 128, generator=gen))
    out = []
    for dev in ("cpu", "cuda"):
        x = emb.to(dev).requires_grad_()
        loss = quartet_loss(x, labels.to(dev), 0.3, metric)
        loss.backward()
        out.append((loss.detach().cpu(), x.grad.cpu()))
    torch.testing.assert_close(out[1][0], out[0][0], **TOL[torch.float32])
    torch.testing.assert_close(out[1][1], out[0][1], atol=1e-5, rtol=1e-4)


@requires_cuda
def test_cuda_side_stream_and_second_device(gen):
    emb, labels = _hub_batch(128, 64, gen)
    want = quartet_loss(emb, labels)
    for dev in ["cuda:0"] + (["cuda:1"] if torch.cuda.device_count() > 1 else []):
        stream = torch.cuda.Stream(device=dev)
        with torch.cuda.stream(stream):
            x = emb.to(dev).requires_grad_()
            loss = quartet_loss(x, labels.to(dev))
            loss.backward()
        stream.synchronize()
        torch.testing.assert_close(loss.cpu(), want, **TOL[torch.float32])


def test_loss_modules(gen):
    emb = torch.randn(16, 8, generator=gen)
    labels = torch.arange(16) // 4
    assert torch.equal(QuartetLoss(0.25)(emb, labels), quartet_loss(emb, labels, 0.25))
    assert torch.equal(
        TripletLoss(0.2, "cosine", soft_margin=True)(emb, labels),
        triplet_loss(emb, labels, 0.2, "cosine", True),
    )
    assert "margin=0.25" in repr(QuartetLoss(0.25))
    logits = torch.randn(16, 5, generator=gen, requires_grad=True)
    targets = torch.randint(0, 5, (16,), generator=gen)
    torch.testing.assert_close(CrossEntropyLabelSmooth(5, 0.0)(logits, targets), F.cross_entropy(logits, targets))
    torch.testing.assert_close(
        CrossEntropyLabelSmooth(5, 0.1)(logits, targets),
        F.cross_entropy(logits, targets, label_smoothing=0.1),
    )
    with pytest.raises(ValueError, match="logits must be"):
        CrossEntropyLabelSmooth(4)(logits, targets)


def test_reference_switch(gen):
    emb = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    labels = torch.arange(8) // 2
    with use_reference_ops():
        r = quartet_loss(emb, labels)
        mined = batch_hard_mining(torch.cdist(emb, emb), labels)
    assert torch.equal(r, reference.quartet_loss(emb, labels))
    assert mined[6].dtype == torch.int8
    torch.testing.assert_close(quartet_loss(emb, labels), r, **TOL[torch.float64])
