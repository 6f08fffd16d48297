"""t-SNE of embeddings (paper Fig. 5): up to 10 identities, coloured by identity, with one
marker per domain (e.g. real target images vs translated source images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._canvas import save_figure

MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")


def tsne_embed(
    embeddings: Any, perplexity: float = 30.0, seed: int = 0, threads: int | None = 1
) -> np.ndarray:
    """``[N, 2]`` t-SNE coordinates (scikit-learn; perplexity cut to ``N - 1``).

    ``threads`` caps the OpenMP threads of scikit-learn's Barnes-Hut gradient (``None``: its
    default, every core). One thread is the default: for the few hundred points of a figure
    the OpenMP barriers cost far more than they save, and on a busy machine a thread per core
    makes the fit 40x slower (12 s instead of 0.3 s for 60 points on 2 loaded cores).
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = (
        embeddings.detach().float().cpu().numpy()
        if hasattr(embeddings, "detach")
        else np.asarray(embeddings, dtype=np.float32)
    )
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"tsne_embed: need at least 3 points, got {n}")
    tsne = TSNE(
        n_components=2, perplexity=min(perplexity, n - 1.0), init="pca", random_state=seed
    )
    with threadpool_limits(limits=threads, user_api="openmp"):
        return tsne.fit_transform(x)


def plot_tsne(
    embeddings: Any,
    pids: Any,
    out_path: str | Path,
    domains: Any = None,
    domain_names: dict[int, str] | None = None,
    max_ids: int = 10,
    perplexity: float = 30.0,
    seed: int = 0,
    size_px: tuple[int, int] = (800, 800),
    dpi: int = 100,
    title: str | None = None,
) -> tuple[Path, np.ndarray]:
    """Writes the t-SNE scatter of the embeddings of (at most) ``max_ids`` identities.

    Args:
        embeddings: ``[N, D]``; pids: ``[N]`` identity labels; domains: optional ``[N]``
            integer domain of each point (marker shape), named by ``domain_names``.
        max_ids: identities kept (the first ``max_ids`` distinct pids in sorted order).
        size_px: (width, height) of the PNG in pixels.

    Returns ``(path, keep)``: the PNG path and the boolean mask of the points plotted.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pids = np.asarray(pids.cpu() if hasattr(pids, "cpu") else pids).reshape(-1)
    emb = (
        embeddings.detach().float().cpu().numpy()
        if hasattr(embeddings, "detach")
        else np.asarray(embeddings)
    )
    if emb.ndim != 2 or emb.shape[0] != pids.shape[0]:
        raise ValueError(
            "plot_tsne: embeddings [N, D] and pids [N] must agree, "
            f"got {emb.shape} and {pids.shape}"
        )
    doms = (
        np.zeros_like(pids)
        if domains is None
        else np.asarray(domains.cpu() if hasattr(domains, "cpu") else domains).reshape(-1)
    )
    chosen = np.unique(pids)[:max_ids]
    keep = np.isin(pids, chosen)
    xy = tsne_embed(emb[keep], perplexity=perplexity, seed=seed)
    p, d = pids[keep], doms[keep]

    w, h = size_px
    fig = Figure(figsize=((w + 1e-3) / dpi, (h + 1e-3) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    _scatter(ax, xy, p, d, chosen, (domain_names or {}) if domains is not None else None)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, out_path, dpi), keep


def _scatter(ax, xy: np.ndarray, p: np.ndarray, d: np.ndarray, chosen: np.ndarray,
             domain_names: dict[int, str] | None) -> None:
    """One colour per identity, one marker per domain, and the legend (domains named when
    ``domain_names`` is not ``None``)."""
    import matplotlib

    colors = matplotlib.colormaps["tab10"]
    for ci, pid in enumerate(chosen):
        for di, dom in enumerate(np.unique(d)):
            m = (p == pid) & (d == dom)
            if not m.any():
                continue
            label = f"id {pid}" if di == 0 else None
            ax.scatter(
                xy[m, 0],
                xy[m, 1],
                s=28,
                color=colors(ci % 10),
                marker=MARKERS[int(di) % len(MARKERS)],
                label=label,
                edgecolors="none",
            )
    handles, labels = ax.get_legend_handles_labels()
    if domain_names is not None:
        from matplotlib.lines import Line2D

        for di, dom in enumerate(np.unique(d)):
            name = domain_names.get(int(dom), f"domain {dom}")
            handles.append(
                Line2D([], [], color="k", marker=MARKERS[di % len(MARKERS)], linestyle="none")
            )
            labels.append(name)
    ax.legend(
        handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False
    )
