"""Re-ID losses of EDAAN's re-ID module: quartet (eq. 7), triplet (eq. 6) and the softmax ID loss.

``QuartetLoss`` and ``TripletLoss`` wrap the fused ops :func:`edaan_fast.ops.quartet_loss` and
:func:`edaan_fast.ops.triplet_loss` (batch-hard mining, backward from the selected pairs only);
``CrossEntropyLabelSmooth`` is torchreid's label-smoothed cross entropy (``L_id``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import metric_losses

__all__ = ["CrossEntropyLabelSmooth", "QuartetLoss", "TripletLoss"]


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


class CrossEntropyLabelSmooth(nn.Module):
    """Cross entropy with label smoothing (torchreid's), the ID loss ``L_id``.

    Targets ``(1 - epsilon) * onehot(y) + epsilon / num_classes``; ``epsilon = 0`` is plain
    cross entropy. ``forward(logits [B, num_classes], targets [B] int64) -> 0-dim loss`` (the
    mean over the batch, computed in float32 for float16/bfloat16 logits).
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"CrossEntropyLabelSmooth: num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"CrossEntropyLabelSmooth: epsilon must be in [0, 1], got {epsilon}")
        self.num_classes = int(num_classes)
        self.epsilon = float(epsilon)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"CrossEntropyLabelSmooth: logits must be [B, {self.num_classes}], got "
                f"{list(logits.shape)}"
            )
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        log_probs = torch.log_softmax(logits, dim=1)
        onehot = torch.zeros_like(log_probs).scatter_(1, targets.unsqueeze(1), 1.0)
        smoothed = (1.0 - self.epsilon) * onehot + self.epsilon / self.num_classes
        return (-smoothed * log_probs).mean(0).sum()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, epsilon={self.epsilon}"
