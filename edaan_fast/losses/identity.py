"""Identity (softmax cross-entropy) loss of the re-ID module (paper eq. 8).

Paper symbols -> code: ``L_id = -log p(y | x)`` averaged over the batch, with ``p`` the softmax
of the classifier logits ``ReIDOutput.logits``. EDAAN applies it to the real source images and
their S -> T translations, both with the source labels. ``label_smoothing`` (0 by default, as
the paper) is the torchreid/fast-reid option; :class:`CrossEntropyLabelSmooth` is torchreid's
module form of the same loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrossEntropyLabelSmooth", "id_loss"]


def id_loss(logits: torch.Tensor, labels: torch.Tensor,
            label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` ``[N, num_ids]`` against int64 ``labels`` ``[N]``."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


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
