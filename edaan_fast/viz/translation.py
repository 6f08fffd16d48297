"""Translation figure (paper Fig. 4): rows of source images next to their EDAAN translations
and the translations of the same model without attention (or CycleGAN)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._canvas import WHITE, fit_fontsize, save_canvas, to_uint8_image

GAP = 4


def plot_translation_grid(
    columns: Mapping[str, Any],
    out_path: str | Path,
    value_range: tuple[float, float] | None = None,
    label_height: int = 20,
    dpi: int = 100,
) -> Path:
    """Writes a grid with one column per entry of ``columns`` (title -> ``[N, 3, H, W]``
    images, all the same shape) and one row per image. ``value_range`` as in
    :func:`edaan_fast.viz.attention.plot_attention`, shared by all columns.

    The PNG is ``C W + (C - 1) 4`` wide and ``label_height + N H + (N - 1) 4`` high."""
    if not columns:
        raise ValueError("plot_translation_grid: no columns")
    arrays = {
        k: (
            v.detach().float().cpu().numpy()
            if hasattr(v, "detach")
            else np.asarray(v, dtype=np.float64)
        )
        for k, v in columns.items()
    }
    shapes = {k: a.shape for k, a in arrays.items()}
    first = next(iter(shapes.values()))
    if len(first) != 4 or first[1] != 3 or any(s != first for s in shapes.values()):
        raise ValueError(
            f"plot_translation_grid: every column must be [N, 3, H, W] of one shape, got {shapes}"
        )
    n, _, h, w = first
    if value_range is None:
        value_range = (-1.0, 1.0) if min(a.min() for a in arrays.values()) < 0 else (0.0, 1.0)
    c = len(arrays)
    canvas = np.full(
        (label_height + n * h + (n - 1) * GAP, c * w + (c - 1) * GAP, 3), WHITE, dtype=np.uint8
    )
    for j, a in enumerate(arrays.values()):
        for i in range(n):
            y0, x0 = label_height + i * (h + GAP), j * (w + GAP)
            canvas[y0 : y0 + h, x0 : x0 + w] = to_uint8_image(a[i], value_range=value_range)
    texts = [
        (j * (w + GAP) + w / 2, label_height / 2, name, fit_fontsize(name, w, label_height, dpi))
        for j, name in enumerate(arrays)
    ]
    return save_canvas(canvas, out_path, texts, dpi=dpi)


def plot_translations(
    sources: Any,
    edaan: Any,
    no_attention: Any,
    out_path: str | Path,
    no_attention_title: str = "w/o attention",
    **kwargs,
) -> Path:
    """Fig. 4's comparison: ``source | EDAAN | no-attention`` translations (``[N, 3, H, W]``
    each; pass CycleGAN's output with ``no_attention_title="CycleGAN"``)."""
    return plot_translation_grid(
        {"source": sources, "EDAAN": edaan, no_attention_title: no_attention}, out_path, **kwargs
    )
