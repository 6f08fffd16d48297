"""Attention figure (paper Fig. 7): per image, a row ``image | attention mask | foreground |
background``, plus ``true person`` where a ground-truth mask exists (the synthetic set).
EDAAN's mask ``A(x)`` marks the preserved person (eq. 1), so the foreground is ``A(x) * x`` and
the background ``(1 - A(x)) * x``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._canvas import WHITE, fit_fontsize, save_canvas, to_uint8_image

COLUMNS = ("image", "attention", "foreground", "background")
GAP = 4


def plot_attention(
    images: Any,
    masks: Any,
    out_path: str | Path,
    value_range: tuple[float, float] | None = None,
    label_height: int = 20,
    dpi: int = 100,
    truth: Any = None,
) -> Path:
    """Writes an ``N x 4`` grid: image, mask (grey), foreground ``A x``, background ``(1-A) x``;
    with ``truth`` (``[N, 1, H, W]`` person masks in [0, 1]) a fifth column shows it.

    Args:
        images: ``[N, 3, H, W]`` tensor/array (values in ``value_range``; default ``(-1, 1)``
            if any is negative, else ``(0, 1)``).
        masks: ``[N, 1, H, W]`` or ``[N, H, W]`` attention in [0, 1].
        out_path: PNG file.

    The PNG is ``k W + (k - 1) 4`` pixels wide (``k`` columns) and ``label_height + N H +
    (N - 1) 4`` high.
    """
    images = (
        images.detach().float().cpu().numpy()
        if hasattr(images, "detach")
        else np.asarray(images, dtype=np.float64)
    )
    masks = (
        masks.detach().float().cpu().numpy()
        if hasattr(masks, "detach")
        else np.asarray(masks, dtype=np.float64)
    )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"plot_attention: images must be [N, 3, H, W], got {images.shape}")
    if masks.ndim == 3:
        masks = masks[:, None]
    n, _, h, w = images.shape
    if masks.shape != (n, 1, h, w):
        raise ValueError(
            f"plot_attention: masks must be [N, 1, H, W] = {(n, 1, h, w)}, got {masks.shape}"
        )
    names = list(COLUMNS)
    if truth is not None:
        truth = (truth.detach().float().cpu().numpy() if hasattr(truth, "detach")
                 else np.asarray(truth, dtype=np.float64))
        if truth.ndim == 3:
            truth = truth[:, None]
        if truth.shape != (n, 1, h, w):
            raise ValueError(
                f"plot_attention: truth must be [N, 1, H, W] = {(n, 1, h, w)}, got {truth.shape}"
            )
        names.append("true person")
    if value_range is None:
        value_range = (-1.0, 1.0) if images.min() < 0 else (0.0, 1.0)
    lo, _ = value_range
    k = len(names)
    canvas = np.full(
        (label_height + n * h + (n - 1) * GAP, k * w + (k - 1) * GAP, 3), WHITE, dtype=np.uint8
    )
    for i in range(n):
        x, a = images[i], masks[i].clip(0, 1)
        # foreground/background: the hidden part shown black (the range's low end)
        cols = [x, a, a * x + (1 - a) * lo, (1 - a) * x + a * lo]
        if truth is not None:
            cols.append(truth[i].clip(0, 1))
        for j, c in enumerate(cols):
            rng = (0.0, 1.0) if j in (1, 4) else value_range
            y0, x0 = label_height + i * (h + GAP), j * (w + GAP)
            canvas[y0 : y0 + h, x0 : x0 + w] = to_uint8_image(c, value_range=rng)
    texts = [
        (j * (w + GAP) + w / 2, label_height / 2, name, fit_fontsize(name, w, label_height, dpi))
        for j, name in enumerate(names)
    ]
    return save_canvas(canvas, out_path, texts, dpi=dpi)
