"""The progress bars of the package: the one place that decides whether a bar is drawn.

A bar is drawn when it is asked for and its stream (stderr by default) is a terminal, or in a
Jupyter notebook (tqdm's notebook bar). Otherwise -- a log file, a pipe, a batch job -- it is
switched off: a bar redraws itself with carriage returns, which fill a log with partial lines.
What a log needs is written by the callers as log lines (the trainer's one line per epoch).
``EDAAN_FAST_PROGRESS=1`` draws bars on any stream, ``EDAAN_FAST_PROGRESS=0`` never.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

__all__ = ["progress_bar", "progress_wanted"]


def _in_notebook() -> bool:
    from tqdm.autonotebook import tqdm as chosen
    from tqdm.std import tqdm as plain

    return chosen is not plain


def progress_wanted(file: IO | None = None) -> bool:
    """Whether a bar on ``file`` (default: ``sys.stderr``) would be drawn."""
    forced = os.environ.get("EDAAN_FAST_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stderr if file is None else file
    try:
        if stream is not None and stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return "ipykernel" in sys.modules and _in_notebook()


def progress_bar(iterable: Any = None, *, enabled: bool = True, file: IO | None = None,
                 **kwargs: Any):
    """A ``tqdm`` bar over ``iterable`` (``total=``, ``desc=``, ``unit=``... as tqdm takes
    them), drawn when ``enabled`` and :func:`progress_wanted`; a switched-off bar still
    iterates and counts, silently."""
    from tqdm.auto import tqdm

    draw = enabled and progress_wanted(file)
    return tqdm(iterable, disable=not draw, file=file, **kwargs)
