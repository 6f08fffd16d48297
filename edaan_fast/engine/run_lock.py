"""One process at a time per output: an advisory lock beside each output folder or file.

A run (``train``), a translation (``translate --output-dir``) and an evaluation's outputs
(``evaluate --output``, ``--export-features``, ``--figures``) hold, for as long as they run, the
lock file ``.<name>.lock`` beside their output ``<name>`` (beside, not inside, so that a folder
a command expects empty stays empty). The file holds the holder's process id, host, start time
and command line; the lock itself is ``flock`` on it, which the kernel drops when the holder
dies, however it dies. So:

- a second process that wants the same output exits with one line naming the holder
  (:class:`OutputBusyError`);
- a lock file left by a process that is no longer running on this host (``SIGKILL``, a power
  cut on a local disk) is taken over with a warning naming the dead process;
- a lock file written on another host (a shared file system, where ``flock`` may not reach
  across hosts) is refused while it names a host other than this one: delete it by hand once
  that run is gone (the message names the file).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

logger = logging.getLogger("edaan_fast.engine.run_lock")

__all__ = ["OutputBusyError", "OutputLock", "hold_outputs", "lock_path"]


class OutputBusyError(RuntimeError):
    """Another process holds the lock of an output this process was to write."""


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of ``output`` (a folder or a file): ``.<name>.lock`` beside it."""
    output = Path(os.path.abspath(output))
    return output.parent / f".{output.name}.lock"


def _started_at(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where /proc says; else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        boot = next(float(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines()
                    if ln.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _alive(pid: int, since: float | None = None) -> bool:
    """Whether ``pid`` runs, and (where /proc tells) is the process that started no later
    than ``since``, not a newer one that was given the same pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        pass
    started = _started_at(pid) if since is not None else None
    return started is None or started <= since + 1.0  # /proc's times are in clock ticks


def _read(fd: int) -> dict:
    """The holder record in an open lock file (empty if unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _holder(record: dict) -> str:
    if not record.get("pid"):
        return "another process (its lock file names none)"
    when = record.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(when)) if when else ""
    command = f" ({record['command']})" if record.get("command") else ""
    return f"pid {record['pid']} on {record.get('host', '?')}{since}{command}"


class OutputLock:
    """The lock of one output (see the module docstring): :meth:`acquire`, :meth:`release`.

    ``what`` names the output in messages (``"output_dir"``, ``"--output-dir"``, ...).
    """

    def __init__(self, output: str | os.PathLike, what: str):
        self.output, self.what = Path(output), what
        self.path = lock_path(output)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock or raise :class:`OutputBusyError` naming its holder. Where the lock
        file cannot be created (the output's folder cannot be: a file is in the way, no
        permission) nothing is locked: the command's own check of the output says why."""
        for _ in range(10):  # another process may replace the file between open and flock
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                logger.debug("no lock for %s: %s", self.output, exc)
                return self
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _read(fd)
                os.close(fd)
                raise OutputBusyError(
                    f"{self.what} {self.output} is in use by another process: "
                    f"{_holder(record)}; wait for it to finish or choose another "
                    f"{self.what}") from None
            if self._same_file(fd):
                break
            os.close(fd)
        else:
            raise OutputBusyError(f"{self.what} {self.output}: cannot take its lock "
                                  f"{self.path} (it keeps being replaced)")
        try:
            self._take_over(fd, _read(fd))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:  # the previous holder removed it after we opened it
            return False

    def _take_over(self, fd: int, previous: dict) -> None:
        """Write this process into the locked file, after checking what it held."""
        host = socket.gethostname()
        pid = previous.get("pid")
        if pid and previous.get("host") not in (None, host):
            raise OutputBusyError(
                f"{self.what} {self.output} is locked by {_holder(previous)}, another host; "
                f"if that process is gone, delete {self.path}")
        if pid and pid != os.getpid():
            alive = _alive(int(pid), previous.get("started"))
            state = "still running, but not holding it" if alive else "not running"
            logger.warning("%s %s: took over the lock %s left by %s (%s)", self.what,
                           self.output, self.path, _holder(previous), state)
        record = {"pid": os.getpid(), "host": host, "started": time.time(),
                  "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:500]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def hold_outputs(*outputs: tuple[str, str | os.PathLike | None]):
    """Hold the locks of ``(what, path)`` outputs (``None`` paths are skipped) for the
    ``with`` block; raises :class:`OutputBusyError` (holding none) if one is taken."""
    with ExitStack() as stack:
        for what, path in outputs:
            if path is not None:
                stack.enter_context(OutputLock(path, what))
        yield
