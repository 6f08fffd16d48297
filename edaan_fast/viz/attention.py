"""Attention figure (paper Fig. 7): per image, a row ``image | attention mask | foreground |
background``. EDAAN's mask ``A(x)`` marks the preserved person (eq. 1), so the foreground is
``A(x) * x`` and the background ``(1 - A(x)) * x``."""

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
) -> Path:
    """Writes an ``N x 4`` grid: image, mask (grey), foreground ``A x``, background ``(1-A) x``.

    Args:
        images: ``[N, 3, H, W]`` tensor/array (values in ``value_range``; default ``(-1, 1)``
            if any is negative, else ``(0, 1)``).
        masks: ``[N, 1, H, W]`` or ``[N, H, W]`` attention in [0, 1].
        out_path: PNG file.

    The PNG is ``4 W + 3 * 4`` pixels wide and ``label_height + N H + (N - 1) 4`` high.
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
    if value_range is None:
        value_range = (-1.0, 1.0) if images.min() < 0 else (0.0, 1.0)
    lo, _ = value_range
    canvas = np.full(
        (label_height + n * h + (n - 1) * GAP, 4 * w + 3 * GAP, 3), WHITE, dtype=np.uint8
    )
    for i in range(n):
        x, a = images[i], masks[i].clip(0, 1)
        # foreground/background: the hidden part shown black (the range's low end)
        cols = [x, a, a * x + (1 - a) * lo, (1 - a) * x + a * lo]
        for j, c in enumerate(cols):
            rng = (0.0, 1.0) if j == 1 else value_range
            y0, x0 = label_height + i * (h + GAP), j * (w + GAP)
            canvas[y0 : y0 + h, x0 : x0 + w] = to_uint8_image(c, value_range=rng)
    texts = [
        (j * (w + GAP) + w / 2, label_height / 2, name, fit_fontsize(name, w, label_height, dpi))
        for j, name in enumerate(COLUMNS)
    ]
    return save_canvas(canvas, out_path, texts, dpi=dpi)
