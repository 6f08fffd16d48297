"""edaan_fast.viz: the paper's figures as PNG files (matplotlib's Agg canvas, imported lazily).

* :func:`plot_rank_list` / :func:`rank_list_for_query` -- Fig. 6, ranked retrieval of one query;
  :func:`plot_rank_lists` / :func:`rank_lists_for_queries` -- several queries in one figure;
* :func:`plot_tsne` -- Fig. 5, t-SNE of embeddings;
* :func:`plot_attention` -- Fig. 7, image | mask | foreground | background;
* :func:`plot_translations` / :func:`plot_translation_grid` -- Fig. 4, translations.

Needs the ``[viz]`` extras (matplotlib, scikit-learn for t-SNE).
"""

from .attention import plot_attention
from .rank_list import (
    plot_rank_list,
    plot_rank_lists,
    rank_list_for_query,
    rank_lists_for_queries,
)
from .translation import plot_translation_grid, plot_translations
from .tsne import plot_tsne, tsne_embed

__all__ = [
    "plot_attention",
    "plot_rank_list",
    "plot_rank_lists",
    "plot_translation_grid",
    "plot_translations",
    "plot_tsne",
    "rank_list_for_query",
    "rank_lists_for_queries",
    "tsne_embed",
]
