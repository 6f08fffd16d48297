"""Former home of k-reciprocal re-ranking; it lives in :mod:`edaan_fast.metrics.reranking`.
This module re-exports it so that existing imports keep working."""

from edaan_fast.metrics.reranking import *  # noqa: F401,F403
from edaan_fast.metrics.reranking import __all__, _reference_re_ranking  # noqa: F401
