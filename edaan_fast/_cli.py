"""What the command-line entry points share: the one-line form of an error message."""

from __future__ import annotations

import re

__all__ = ["one_line"]

_QUALIFIED = re.compile(r"^(?:[A-Za-z_][\w]*\.)+[A-Za-z_]\w*: ")


def one_line(error: BaseException | str) -> str:
    """``error``'s message as one line: its lines joined with spaces. An error raised in a
    DataLoader worker arrives wrapped in the worker's traceback; its last line is the message
    (without the qualified exception name in front of it)."""
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    if "Original Traceback" in text:
        return _QUALIFIED.sub("", lines[-1], count=1)
    return " ".join(lines)
