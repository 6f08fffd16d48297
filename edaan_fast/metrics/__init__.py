"""edaan_fast.metrics: how good a model is at what each component is for.

- :mod:`~edaan_fast.metrics.attention`: attention maps against the true person (ROC-AUC, IoU)
  and the label-free proxies (spatial spread, centre contrast).
"""

from .attention import AttentionQuality, attention_quality, roc_auc

__all__ = ["AttentionQuality", "attention_quality", "roc_auc"]
