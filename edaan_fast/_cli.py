"""What the command-line entry points share: the one-line form of an error message, and
running a command so that bad inputs end as that one line on stderr with exit status 2."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Sequence

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "input_errors", "one_line", "run_command",
           "setup_logging"]

EXIT_ERROR = 2

#: The exceptions that mean bad inputs in every command (module, class name).
INPUT_ERRORS = (("edaan_fast.data.base", "DatasetError"),
                ("edaan_fast.engine.checkpoint", "CheckpointError"),
                ("edaan_fast.engine.run_lock", "OutputBusyError"),
                ("edaan_fast.ops._library", "OpsNotAvailableError"))

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


def input_errors(extra: Sequence[tuple[str, str]] = ()) -> tuple[type[BaseException], ...]:
    """The exception types of :data:`INPUT_ERRORS` and ``extra`` whose modules are imported
    (only those can have raised theirs, so a failure does not import more code)."""
    types = []
    for module, name in (*INPUT_ERRORS, *extra):
        mod = sys.modules.get(module)
        if mod is not None:
            types.append(getattr(mod, name))
    return tuple(types)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C


def run_command(prog: str, call: Callable[[], object],
                extra: Sequence[tuple[str, str]] = ()) -> int:
    """Run ``call()``; return 0, or write a bad input's error as one line on stderr
    (``<prog>: error: ...``) and return :data:`EXIT_ERROR`, or on Ctrl-C one line
    (``<prog>: interrupted``) and :data:`EXIT_INTERRUPTED`. Other exceptions propagate."""
    try:
        call()
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not isinstance(exc, input_errors(extra)):
            raise
        sys.stderr.write(f"{prog}: error: {one_line(exc)}\n")
        return EXIT_ERROR
    return 0


def setup_logging(quiet: bool) -> None:
    """Log lines ``<logger>: message`` on stderr: INFO, or WARNING with ``quiet``."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(name)s: %(message)s", stream=sys.stderr)
