"""edaan_fast.metrics: how good a model is at what each component is for -- one home for the
numbers, computed from features, distances and maps (never from a model or a data loader).

- :mod:`~edaan_fast.metrics.protocols`: the paper's ranking protocols (Market-1501/Duke single
  query, CUHK03 single-gallery-shot, PRID2011 both ways) on top of the fused rank evaluator;
- :mod:`~edaan_fast.metrics.reranking`: k-reciprocal re-ranking on the fused re-ranking ops;
- :mod:`~edaan_fast.metrics.features`: :class:`Features`, distances, which protocol function
  ranks a pair, and the ``.npz`` features file of ``--export-features``;
- :mod:`~edaan_fast.metrics.attention`: attention maps against the true person (ROC-AUC, IoU)
  and the label-free proxies (spatial spread, centre contrast).

``edaan_fast.ops`` keeps the ranking ops and their re-exports (``evaluate_rank``,
``rank_metrics``); the modules above are imported on use, so importing this package stays light.
"""

from .attention import AttentionQuality, attention_quality, position_auc, roc_auc

__all__ = ["AttentionQuality", "attention_quality", "position_auc", "roc_auc"]
