"""Identity (softmax cross-entropy) loss of the re-ID module (paper eq. 8).

Paper symbols -> code: ``L_id = -log p(y | x)`` averaged over the batch, with ``p`` the softmax
of the classifier logits ``ReIDOutput.logits``. EDAAN applies it to the real source images and
their S -> T translations, both with the source labels. ``label_smoothing`` (0 by default, as
the paper) is the torchreid/fast-reid option.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["id_loss"]


def id_loss(logits: torch.Tensor, labels: torch.Tensor,
            label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` ``[N, num_ids]`` against int64 ``labels`` ``[N]``."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
