"""The discriminative re-ID module of EDAAN on the shared source encoder (paper §III-B, §IV-B).

Paper symbols -> code: the "feature vector" of §IV-B is the encoder output ``E_S(x)``
averaged within ``stripes`` horizontal bands (``[N, feature_dim * stripes]``; the paper does
not say how the map becomes a vector; why not one global average:
:attr:`~edaan_fast.models.ModelConfig.reid_stripes`). Two heads read it:

- the classifier for ``L_id`` (eq. 8): FC -> 128, BatchNorm, dropout 0.5, ReLU, FC ->
  ``num_ids`` logits (in the paper's order: "a 128-dim fully connected layer, batch
  normalisation, dropout, ReLU and finally ... a fully connected layer");
- the embedding for ``L_quartet`` / ``L_triplet`` (eq. 6/7): one FC to 128 dimensions.

At test time only ``E_S`` and the embedding run (on the target's query and gallery):
:meth:`EDAAN.extract_features`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ReIDHead", "ReIDOutput"]


@dataclass
class ReIDOutput:
    """What the re-ID module computes for a batch.

    Attributes:
        feature: pooled encoder feature ``[N, feature_dim * stripes]``.
        embedding: ``[N, embedding_dim]``, input of the metric loss (eq. 6/7) and of retrieval.
        logits: ``[N, num_ids]`` identity logits for ``L_id`` (eq. 8).
    """

    feature: torch.Tensor
    embedding: torch.Tensor
    logits: torch.Tensor


class ReIDHead(nn.Module):
    """Pooled ``E_S`` features -> identity logits and the metric embedding."""

    def __init__(self, feature_dim: int, num_ids: int, bottleneck: int = 128,
                 embedding_dim: int = 128, dropout: float = 0.5, stripes: int = 1):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((stripes, 1))
        feature_dim *= stripes
        self.classifier = nn.Sequential(
            nn.Linear(feature_dim, bottleneck),
            nn.BatchNorm1d(bottleneck),
            nn.Dropout(dropout),
            nn.ReLU(inplace=True),
            nn.Linear(bottleneck, num_ids),
        )
        self.embedding = nn.Linear(feature_dim, embedding_dim)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, C, h, w]`` encoder map -> ``[N, C * stripes]`` feature vector (band means)."""
        return self.pool(features).flatten(1)

    def forward(self, features: torch.Tensor) -> ReIDOutput:
        f = self.pooled(features)
        return ReIDOutput(feature=f, embedding=self.embedding(f), logits=self.classifier(f))
