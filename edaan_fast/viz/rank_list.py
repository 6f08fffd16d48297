"""Ranked retrieval figure (paper Fig. 6): a query and its top-k gallery images, each gallery
image framed green for a correct match and red for a false one; several queries stacked in one
figure with :func:`plot_rank_lists` / :func:`rank_lists_for_queries`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._canvas import GREEN, RED, WHITE, fit_fontsize, framed, save_canvas, to_uint8_image

QUERY_FRAME = (90, 90, 90)
GAP = 4  # pixels between gallery cells
QUERY_GAP = 16  # pixels between the query and the first gallery cell


def cell_origin(
    i: int, size: tuple[int, int] = (128, 64), frame: int = 4, label_height: int = 20
) -> tuple[int, int]:
    """(row, column) of the top-left pixel of cell ``i``'s frame (0 = query, 1.. = ranks)."""
    cell_w = size[1] + 2 * frame
    x = 0 if i == 0 else cell_w + QUERY_GAP + (i - 1) * (cell_w + GAP)
    return label_height, x


def _row_canvas(
    query: Any,
    gallery: Sequence[Any],
    matches: Sequence[bool],
    size: tuple[int, int],
    frame: int,
    label_height: int,
    dpi: int,
    query_label: str = "query",
) -> tuple[np.ndarray, list[tuple]]:
    """One rank list (labels strip + framed cells) as an array, and its text labels."""
    if len(gallery) != len(matches):
        raise ValueError(
            f"plot_rank_list: {len(gallery)} gallery images but {len(matches)} match flags"
        )
    k = len(gallery)
    cell_h, cell_w = size[0] + 2 * frame, size[1] + 2 * frame
    width = cell_origin(k, size, frame, label_height)[1] + cell_w if k else cell_w
    canvas = np.full((label_height + cell_h, width, 3), WHITE, dtype=np.uint8)
    texts = []
    cells = [(query, QUERY_FRAME, query_label)] + [
        (img, GREEN if ok else RED, str(r + 1)) for r, (img, ok) in enumerate(zip(gallery, matches))
    ]
    for i, (img, color, label) in enumerate(cells):
        y, x = cell_origin(i, size, frame, label_height)
        canvas[y : y + cell_h, x : x + cell_w] = framed(to_uint8_image(img, size), color, frame)
        texts.append(
            (
                x + cell_w / 2,
                label_height / 2,
                label,
                fit_fontsize(label, cell_w, label_height, dpi),
            )
        )
    return canvas, texts


def plot_rank_list(
    query: Any,
    gallery: Sequence[Any],
    matches: Sequence[bool],
    out_path: str | Path,
    size: tuple[int, int] = (128, 64),
    frame: int = 4,
    label_height: int = 20,
    dpi: int = 100,
) -> Path:
    """Writes the rank list of one query as a PNG.

    Args:
        query: the query image (path, PIL image, ``[H, W, 3]`` array or ``[3, H, W]`` tensor).
        gallery: its ranked gallery images, best first (typically the top 10).
        matches: one bool per gallery image: True = same identity (green), False = red.
        out_path: PNG file to write.
        size: (height, width) every image is resized to; frame: border width in pixels;
        label_height: strip above the images holding "query" and the rank numbers.

    Returns the path. The PNG is ``label_height + size[0] + 2 frame`` pixels high and
    ``(k + 1) (size[1] + 2 frame) + 16 + 4 (k - 1)`` wide for k gallery images
    (:func:`cell_origin` gives each cell's position).
    """
    canvas, texts = _row_canvas(query, gallery, matches, size, frame, label_height, dpi)
    return save_canvas(canvas, out_path, texts, dpi=dpi)


def plot_rank_lists(
    rows: Sequence[tuple[Any, Sequence[Any], Sequence[bool]]],
    out_path: str | Path,
    size: tuple[int, int] = (128, 64),
    frame: int = 4,
    label_height: int = 20,
    row_gap: int = 8,
    dpi: int = 100,
) -> Path:
    """Writes several rank lists stacked top to bottom in one PNG (the layout of Fig. 6).

    Args:
        rows: ``(query, ranked gallery images, match flags)`` per query, as for
            :func:`plot_rank_list`; every row must hold the same number of gallery images.
        row_gap: white pixels between rows.

    Each row is exactly :func:`plot_rank_list`'s image (labels strip included), so the PNG is
    as wide as one row and ``n (label_height + size[0] + 2 frame) + (n - 1) row_gap`` high;
    row ``i`` starts at pixel row ``i (label_height + size[0] + 2 frame + row_gap)``.
    """
    if not rows:
        raise ValueError("plot_rank_lists: no rows")
    lengths = {len(r[1]) for r in rows}
    if len(lengths) != 1:
        raise ValueError(
            f"plot_rank_lists: every row needs the same number of gallery images, got "
            f"{sorted(lengths)}"
        )
    parts = [
        _row_canvas(q, g, m, size, frame, label_height, dpi, query_label=f"query {i + 1}")
        for i, (q, g, m) in enumerate(rows)
    ]
    h, w = parts[0][0].shape[:2]
    canvas = np.full((len(parts) * h + (len(parts) - 1) * row_gap, w, 3), WHITE, dtype=np.uint8)
    texts = []
    for i, (c, t) in enumerate(parts):
        y0 = i * (h + row_gap)
        canvas[y0 : y0 + h] = c
        texts += [(x, y + y0, text, fs) for x, y, text, fs in t]
    return save_canvas(canvas, out_path, texts, dpi=dpi)


def _ranked(dist_row: Any, q_pid: int, q_camid: int, g_pids: np.ndarray, g_camids: np.ndarray,
            topk: int) -> np.ndarray:
    """Gallery indices of the top ``topk``: a stable order on (distance, index), junk dropped."""
    d = np.asarray(
        dist_row.detach().cpu() if hasattr(dist_row, "detach") else dist_row, dtype=np.float64
    ).reshape(-1)
    order = np.argsort(d, kind="stable")
    return order[~((g_pids[order] == q_pid) & (g_camids[order] == q_camid))][:topk]


def rank_lists_for_queries(
    distmat: Any,
    query_indices: Sequence[int],
    q_pids: Any,
    q_camids: Any,
    g_pids: Any,
    g_camids: Any,
    query_images: Sequence[Any],
    gallery_images: Sequence[Any],
    out_path: str | Path,
    topk: int = 10,
    **kwargs,
) -> Path:
    """:func:`plot_rank_lists` for the queries ``query_indices`` of a ``[Q, G]`` distance matrix,
    ranked as :func:`rank_list_for_query` ranks one (``query_images[i]`` is query ``i``)."""
    d = distmat.detach().cpu().numpy() if hasattr(distmat, "detach") else np.asarray(distmat)
    q_pids, q_camids = np.asarray(q_pids).reshape(-1), np.asarray(q_camids).reshape(-1)
    g_pids, g_camids = np.asarray(g_pids).reshape(-1), np.asarray(g_camids).reshape(-1)
    rows = []
    for i in query_indices:
        order = _ranked(d[i], q_pids[i], q_camids[i], g_pids, g_camids, topk)
        rows.append(
            (
                query_images[i],
                [gallery_images[j] for j in order],
                [bool(g_pids[j] == q_pids[i]) for j in order],
            )
        )
    return plot_rank_lists(rows, out_path, **kwargs)


def rank_list_for_query(
    dist_row: Any,
    q_pid: int,
    q_camid: int,
    g_pids: Any,
    g_camids: Any,
    query_image: Any,
    gallery_images: Sequence[Any],
    out_path: str | Path,
    topk: int = 10,
    **kwargs,
) -> Path:
    """Ranks the gallery for one query (a stable order on (distance, index), dropping the
    gallery items with the query's pid and camera as the evaluation does) and plots its top
    ``topk`` with :func:`plot_rank_list`. ``gallery_images[j]`` is gallery item ``j``."""
    g_pids, g_camids = np.asarray(g_pids).reshape(-1), np.asarray(g_camids).reshape(-1)
    order = _ranked(dist_row, q_pid, q_camid, g_pids, g_camids, topk)
    return plot_rank_list(
        query_image,
        [gallery_images[j] for j in order],
        [bool(g_pids[j] == q_pid) for j in order],
        out_path,
        **kwargs,
    )
