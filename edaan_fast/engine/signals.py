"""The signals that stop a training run with a checkpoint, and the exit status of each.

- ``SIGINT`` (Ctrl-C): status 130.
- ``SIGTERM`` (``kill``, ``docker stop``, Kubernetes, a cluster scheduler's cancel or time
  limit before its ``SIGKILL``): status 143.
- ``SIGUSR1`` (SLURM's ``--signal=USR1@<seconds>``: "the time limit is near"): status 138.

On each, the trainer finishes the current iteration, writes ``checkpoint.pt`` and exits with
``128 + signal number``, printing the ``--resume`` command; a second signal stops at once
without writing (the last checkpoint stays intact). The status tells a requeue script why the
run stopped, and running the same command again with ``--resume <output-dir>/checkpoint.pt``
continues it (docs/training.md, "Long runs").
"""

from __future__ import annotations

import signal

__all__ = ["STOP_SIGNALS", "exit_status", "signal_name"]

#: The signals the trainer turns into "checkpoint, then stop".
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def exit_status(signum: int) -> int:
    """The exit status after stopping on ``signum``: ``128 + signum``, as a shell reports a
    process ended by it (130 for Ctrl-C, 143 for SIGTERM, 138 for SIGUSR1)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    """``"SIGTERM"``, ...; ``"signal <n>"`` for a number without a name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
