"""How good an attention map is: its overlap with the true person (paper §III-A, Fig. 7).

EDAAN's attention ``A_d(x)`` is meant to be high on the person (kept by eq. (1)) and low on the
background (translated). A loss value cannot tell whether it is: eq. (5)'s consistency term is
minimised by any constant map. So the reports measure the map against ground truth where it
exists (the embedded synthetic set renders a person mask beside every image), and against
label-free proxies where it does not (real data sets):

=====================  ===========================================================================
``auc``                ROC-AUC of the per-pixel scores, person pixels (mask > 0.5) vs background,
                       pooled over all pixels of all images: 1 = every person pixel scores above
                       every background pixel, 0.5 = no better than a constant, < 0.5 = inverted
``iou``                IoU of ``A > 0.5`` with the person, pooled over the images
``best_iou``           the highest pooled IoU of ``A > t`` over thresholds ``t``, and ``best_t``
``position_auc``       ROC-AUC over the pairs of a person and a background pixel *at the same
                       position* in two images: a map that is the same for every image (a
                       centred blob, the average silhouette) scores exactly 0.5, so this counts
                       only what the map reads from the image, not where the person usually is
``mean``               mean of ``A`` over all pixels
``spatial_std``        the standard deviation of ``A`` within an image, averaged over images
                       (0 for a flat map, whatever its level)
``centre_contrast``    mean ``A`` in the central third of columns minus the mean in the outer
                       thirds: re-ID crops centre the person, so a person-shaped map is > 0
=====================  ===========================================================================

The first four need masks; the last three are the proxies reported for every data set.

Why ``position_auc``: re-ID crops centre the person, so position alone ranks pixels well. On
the embedded set a fixed centred Gaussian blob (no image read at all) scores ``auc`` 0.92 and
``iou`` 0.58, and the training masks' average 0.94 / 0.62 (docs/attention.md §8). ``auc`` and
``iou`` mix that prior with what the net sees; ``position_auc`` separates the two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["AttentionQuality", "attention_quality", "position_auc", "roc_auc"]

#: Thresholds scanned for ``best_iou`` (the map is a sigmoid output in [0, 1]).
THRESHOLDS = np.linspace(0.02, 0.98, 49)


@dataclass(frozen=True)
class AttentionQuality:
    """Scores of one attention net on one set of images (see the module docstring).

    The mask-based fields are ``None`` when no ground truth was given.
    """

    images: int
    mean: float
    spatial_std: float
    centre_contrast: float
    auc: float | None = None
    iou: float | None = None
    best_iou: float | None = None
    best_t: float | None = None
    position_auc: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    def summary(self) -> str:
        """One short line for logs: ``AUC 0.93 IoU 0.61 (best 0.66 @0.40) mean 0.31 std 0.37``."""
        parts = []
        if self.auc is not None:
            parts.append(f"AUC {self.auc:.2f} IoU {self.iou:.2f} "
                         f"(best {self.best_iou:.2f} @{self.best_t:.2f})")
        if self.position_auc is not None:
            parts.append(f"position-AUC {self.position_auc:.2f}")
        parts.append(f"mean {self.mean:.2f} std {self.spatial_std:.2f} "
                     f"centre+{self.centre_contrast:.2f}")
        return " ".join(parts)


def _as_maps(x, name: str) -> torch.Tensor:
    """``[N, H, W]`` float64 from ``[N, 1, H, W]``, ``[N, H, W]`` or ``[H, W]`` arrays."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    t = t.detach().to("cpu", torch.float64)
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    elif t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise ValueError(f"attention_quality: {name} must be [N, 1, H, W], [N, H, W] or [H, W], "
                         f"got shape {tuple(t.shape)}")
    return t


def roc_auc(scores, positive) -> float:
    """ROC-AUC of ``scores`` for the boolean labels ``positive`` (same shape, any shape).

    The Mann-Whitney statistic with tied scores counted as half (average ranks), so a constant
    score gives exactly 0.5.

    Raises:
        ValueError: when the labels hold only one class (the AUC is undefined).
    """
    s = torch.as_tensor(scores).detach().reshape(-1).to("cpu", torch.float64)
    y = torch.as_tensor(positive).detach().reshape(-1).to("cpu", torch.bool)
    if s.shape != y.shape:
        raise ValueError(f"roc_auc: scores and labels must have the same size, got {s.numel()} "
                         f"and {y.numel()}")
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc: needs both classes, got {n_pos} positive and {n_neg} negative")
    values, inverse, counts = torch.unique(s, return_inverse=True, return_counts=True)
    # average rank (1-based) of each distinct value: its tie group's mid-point
    ends = torch.cumsum(counts, 0).to(torch.float64)
    mid = ends - (counts.to(torch.float64) - 1.0) / 2.0
    rank_sum = float(mid[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def position_auc(maps, masks, chunk: int = 4096) -> float | None:
    """ROC-AUC over the (person, background) pixel pairs that share a position in two images.

    ``sum_p U_p / sum_p n_pos(p) n_neg(p)``, where ``U_p`` is the Mann-Whitney count (ties
    half) of the images' scores at position ``p``: the probability that, at the same pixel, a
    person scores above a background. Any map that does not depend on the image scores 0.5.
    Computed per position by sorting the background scores and counting, for each person
    score, the backgrounds below it and equal to it (binary search): ``O(N log N)`` per
    position instead of comparing all ``N^2`` pairs (the same integer counts).

    Args:
        maps, masks: as for :func:`attention_quality` (masks thresholded at 0.5).
        chunk: positions handled at once (memory ``N * chunk``).

    Returns:
        The AUC, or ``None`` when no position holds both a person and a background pixel.
    """
    a = _as_maps(maps, "maps").flatten(1)
    y = _as_maps(masks, "masks").flatten(1) > 0.5
    if a.shape != y.shape:
        raise ValueError(f"position_auc: masks must match the maps' shape, got "
                         f"{tuple(y.shape)} and {tuple(a.shape)}")
    above = ties = pairs = 0
    for lo in range(0, a.shape[1], chunk):
        s, pos = a[:, lo:lo + chunk].T.contiguous(), y[:, lo:lo + chunk].T  # [position, image]
        # background scores in order, persons moved past every finite score
        background = torch.where(pos, torch.full_like(s, float("inf")), s)
        background = background.sort(dim=1).values.contiguous()
        below = torch.searchsorted(background, s, side="left")
        not_above = torch.searchsorted(background, s, side="right")
        above += int(below[pos].sum())
        ties += int((not_above - below)[pos].sum())
        pairs += int((pos.sum(1) * (~pos).sum(1)).sum())
    return (above + 0.5 * ties) / pairs if pairs else None


def _pooled_iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    union = int((pred | truth).sum())
    return float((pred & truth).sum()) / union if union else 1.0


def attention_quality(maps, masks=None) -> AttentionQuality:
    """Score attention maps, against person masks when given.

    Args:
        maps: attention maps in ``[0, 1]``: ``[N, 1, H, W]``, ``[N, H, W]`` (tensor or array).
        masks: ground-truth person masks of the same images (1 = person; soft edges are
            thresholded at 0.5), the same spatial size as ``maps``, or ``None``.

    Raises:
        ValueError: for mismatched shapes, or masks without both person and background pixels.
    """
    a = _as_maps(maps, "maps")
    n, _, w = a.shape
    if n == 0:
        raise ValueError("attention_quality: no attention maps given")
    third = max(w // 3, 1)
    centre = a[:, :, third:w - third] if w >= 3 else a
    outer = torch.cat([a[:, :, :third], a[:, :, w - third:]], dim=2) if w >= 3 else a
    fields = dict(images=n, mean=float(a.mean()),
                  spatial_std=float(a.flatten(1).std(dim=1, unbiased=False).mean()),
                  centre_contrast=float(centre.mean() - outer.mean()))
    if masks is None:
        return AttentionQuality(**fields)
    m = _as_maps(masks, "masks")
    if m.shape != a.shape:
        raise ValueError(f"attention_quality: masks must match the maps' shape {tuple(a.shape)}, "
                         f"got {tuple(m.shape)}")
    truth = m > 0.5
    # position_auc on at most a 64 x 32 grid of positions (its cost grows with N^2 per position)
    sy, sx = -(-a.shape[1] // 64), -(-a.shape[2] // 32)
    ious = [_pooled_iou(a > t, truth) for t in THRESHOLDS]
    best = int(np.argmax(ious))
    return AttentionQuality(**fields, auc=roc_auc(a, truth), iou=_pooled_iou(a > 0.5, truth),
                            best_iou=float(ious[best]), best_t=float(THRESHOLDS[best]),
                            position_auc=position_auc(a[:, ::sy, ::sx], m[:, ::sy, ::sx]))

