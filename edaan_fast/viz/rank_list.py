"""Ranked retrieval figure (paper Fig. 6): a query and its top-k gallery images, each gallery
image framed green for a correct match and red for a false one."""

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
    if len(gallery) != len(matches):
        raise ValueError(
            f"plot_rank_list: {len(gallery)} gallery images but {len(matches)} match flags"
        )
    k = len(gallery)
    cell_h, cell_w = size[0] + 2 * frame, size[1] + 2 * frame
    width = cell_origin(k, size, frame, label_height)[1] + cell_w if k else cell_w
    canvas = np.full((label_height + cell_h, width, 3), WHITE, dtype=np.uint8)
    texts = []
    cells = [(query, QUERY_FRAME, "query")] + [
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
    return save_canvas(canvas, out_path, texts, dpi=dpi)


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
    d = np.asarray(
        dist_row.detach().cpu() if hasattr(dist_row, "detach") else dist_row, dtype=np.float64
    )
    g_pids, g_camids = np.asarray(g_pids).reshape(-1), np.asarray(g_camids).reshape(-1)
    order = np.argsort(d, kind="stable")
    order = order[~((g_pids[order] == q_pid) & (g_camids[order] == q_camid))][:topk]
    return plot_rank_list(
        query_image,
        [gallery_images[j] for j in order],
        [bool(g_pids[j] == q_pid) for j in order],
        out_path,
        **kwargs,
    )
