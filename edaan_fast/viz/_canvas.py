"""Shared helpers of the figures: image conversion, grid composition, pixel-exact PNG output.

matplotlib is imported inside the functions (never at import time) and only through its Agg
canvas, so no global backend is switched and ``import edaan_fast`` stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

GREEN = (0, 200, 0)
RED = (220, 0, 0)
WHITE = (255, 255, 255)


def to_uint8_image(
    x: Any, size: tuple[int, int] | None = None, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """An ``[H, W, 3]`` uint8 image from a path, a PIL image, a numpy array or a tensor.

    Arrays/tensors may be ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` (C in 1, 3); floats are
    mapped from ``value_range`` (default: ``(-1, 1)`` if any value is negative, else
    ``(0, 1)``) to 0..255. ``size = (height, width)`` resizes (bilinear).
    """
    from PIL import Image

    if isinstance(x, (str, Path)):
        img = Image.open(x).convert("RGB")
        arr = np.asarray(img)
    elif isinstance(x, Image.Image):
        arr = np.asarray(x.convert("RGB"))
    else:
        if hasattr(x, "detach"):
            x = x.detach().float().cpu().numpy()
        arr = np.asarray(x)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
            raise ValueError(
                f"viz: expected an image [H, W], [H, W, 1|3] or [1|3, H, W], got shape {arr.shape}"
            )
        if arr.dtype != np.uint8:
            a = arr.astype(np.float64)
            lo, hi = (
                value_range
                if value_range is not None
                else ((-1.0, 1.0) if a.min() < 0 else (0.0, 1.0))
            )
            arr = np.clip(np.rint((a - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
    if size is not None and arr.shape[:2] != tuple(size):
        arr = np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.BILINEAR))
    return np.ascontiguousarray(arr)


def framed(img: np.ndarray, color: Sequence[int], width: int) -> np.ndarray:
    """``img`` with a solid ``width``-pixel border of ``color`` around it."""
    h, w = img.shape[:2]
    out = np.empty((h + 2 * width, w + 2 * width, 3), dtype=np.uint8)
    out[:] = np.asarray(color, dtype=np.uint8)
    out[width : width + h, width : width + w] = img
    return out


def fit_fontsize(text: str, width_px: float, label_height: int, dpi: int = 100) -> float:
    """A font size (points) that fits ``text`` in ``width_px`` and the label strip."""
    px_per_pt = dpi / 72.0
    by_width = (width_px - 4) / (0.62 * px_per_pt * max(len(text), 1))
    return max(4.0, min(label_height * 0.45, by_width))


def save_canvas(
    canvas: np.ndarray, out_path: str | Path, texts: Sequence[tuple] = (), dpi: int = 100
) -> Path:
    """Writes ``canvas`` ([H, W, 3] uint8) as a PNG of exactly ``W x H`` pixels, with optional
    ``(x_px, y_px, text, fontsize)`` labels (pixel coordinates from the top-left, centred)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h, w = canvas.shape[:2]
    fig = Figure(figsize=((w + 1e-3) / dpi, (h + 1e-3) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.figimage(canvas, xo=0, yo=0, origin="upper")
    for x, y, text, fontsize in texts:
        fig.text(x / w, 1.0 - y / h, text, ha="center", va="center", fontsize=fontsize)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=dpi, format="png")
    return out_path


def save_figure(fig, out_path: str | Path, dpi: int) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=dpi, format="png")
    return out_path
