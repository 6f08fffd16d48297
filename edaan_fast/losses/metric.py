"""Metric losses of EDAAN's re-ID module -- quartet (eq. 7) and triplet (eq. 6) -- and their
registry :data:`METRIC_LOSSES` (the run option ``metric_loss`` picks one by name).

``QuartetLoss`` and ``TripletLoss`` wrap the fused ops :func:`edaan_fast.ops.quartet_loss` and
:func:`edaan_fast.ops.triplet_loss` (batch-hard mining, backward from the selected pairs only).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import metric_losses

__all__ = ["METRIC_LOSSES", "QuartetLoss", "TripletLoss", "build_metric_loss"]


class QuartetLoss(nn.Module):
    """Batch-hard quartet loss, EDAAN eq. (7).

    ``mean_i max(D[a,p] - D[a,n] + D[a,p] - D[m,n] + margin, 0)``: ``p`` the hardest positive,
    ``n`` the hardest negative and ``m`` the closest sample to ``n`` from a third identity. An
    anchor whose batch holds no third identity falls back to the triplet term of eq. (6);
    anchors without a positive or a negative are skipped; no anchor with a term gives 0.

    ``forward(emb [B, D], labels [B] int64) -> 0-dim float32 loss`` (float64 for float64 input).
    """

    def __init__(self, margin: float = 0.3, metric: str = "euclidean") -> None:
        super().__init__()
        self.margin = float(margin)
        self.metric = metric

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return metric_losses.quartet_loss(emb, labels, self.margin, self.metric)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, metric={self.metric!r}"


class TripletLoss(nn.Module):
    """Batch-hard triplet loss, EDAAN eq. (6) (torchreid's ``TripletLoss`` with float
    accumulation and a fused backward).

    ``mean_i max(D[a,p] - D[a,n] + margin, 0)``, or ``softplus(D[a,p] - D[a,n])`` with
    ``soft_margin=True``, over the anchors that have a positive and a negative (0 if none).
    """

    def __init__(self, margin: float = 0.3, metric: str = "euclidean",
                 soft_margin: bool = False) -> None:
        super().__init__()
        self.margin = float(margin)
        self.metric = metric
        self.soft_margin = bool(soft_margin)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return metric_losses.triplet_loss(emb, labels, self.margin, self.metric, self.soft_margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, metric={self.metric!r}, soft_margin={self.soft_margin}"


#: The metric losses by run-option name.
METRIC_LOSSES: dict[str, type[nn.Module]] = {"quartet": QuartetLoss, "triplet": TripletLoss}


def build_metric_loss(name: str, margin: float) -> nn.Module:
    """The registered metric loss ``name`` with ``margin``.

    Raises:
        ValueError: an unknown name, listing the choices.
    """
    try:
        cls = METRIC_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown metric loss {name!r}; choices: "
                         f"{', '.join(METRIC_LOSSES)}") from None
    return cls(margin)
