"""What keeps a long run from ending badly: the run folder's lock, the check of every image
before the first iteration, the data digest a resume compares, and the checkpoint written when
a data file, a loader worker or the DALI pipeline fails in the middle of training.

The trainer calls these at four points (construction, resume, the start and the failure of
:meth:`~edaan_fast.engine.trainer.Trainer.fit`); docs/training.md ("Long runs") tells a user
what each does, docs/guarantees.md which test holds it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from edaan_fast.data import DatasetError, ReIDDataset
from edaan_fast.data.base import relabel
from edaan_fast.data.digest import describe_change, records_digest
from edaan_fast.data.image_check import BAD_IMAGES, check_images
from edaan_fast.data.loaders import LoaderFailure

from .checkpoint import CheckpointError
from .run_dir import check_output_dir
from .run_lock import OutputLock
from .signals import signal_name

logger = logging.getLogger("edaan_fast.engine.trainer")

__all__ = ["BAD_IMAGES", "check_data_change", "defer_worker_deaths",
           "lock_run_folder", "run_data_digest", "screen_images", "stop_on_failure"]

SPLITS = ("train", "query", "gallery")
_SHOWN = 10  # bad files named in the error line (all of them are logged above it)


# ---------------------------------------------------------------------------- the lock

def lock_run_folder(folder: Path, resume: str | os.PathLike | None,
                    overwrite: bool) -> OutputLock:
    """Lock ``folder`` for this run (:class:`~.run_lock.OutputLock`), then check again, under
    the lock, that it holds no run this one would replace (another run may have finished
    there since the first check)."""
    lock = OutputLock(folder, "output_dir").acquire()
    try:
        check_output_dir(folder, resume, overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


# ---------------------------------------------------------------------------- image check

def _drop(dataset: ReIDDataset, bad: set[str]) -> ReIDDataset:
    """``dataset`` without the files in ``bad``; training labels stay ``0..n-1``."""
    kept = {split: [r for r in getattr(dataset, split) if r.path not in bad] for split in SPLITS}
    if len({r.pid for r in kept["train"]}) != dataset.num_train_pids:
        kept["train"] = relabel(kept["train"])  # an identity lost all its images
    return dataclasses.replace(dataset, **kept)


def screen_images(source: ReIDDataset, target: ReIDDataset,
                  mode: str) -> tuple[ReIDDataset, ReIDDataset, dict[str, Any]]:
    """Check every image of both data sets' splits (:func:`~edaan_fast.data.image_check.
    check_images`: header and size) before training. Each bad file is logged once; ``mode``
    ``"error"`` then raises one :class:`DatasetError` naming them, ``"skip"`` returns the
    data sets without them. Returns ``(source, target, summary)``, the summary being what
    ``report.json`` records as ``bad_images``."""
    if mode not in BAD_IMAGES:
        raise ValueError(f"bad_images must be one of {', '.join(BAD_IMAGES)}; got {mode!r}")
    paths = [r.path for ds in (source, target) for split in SPLITS for r in getattr(ds, split)]
    start = time.perf_counter()
    bad = check_images(paths)
    seconds = time.perf_counter() - start
    checked = len(set(paths))
    logger.info("checked the %d images of the run's data sets in %.2f s: %s", checked, seconds,
                f"{len(bad)} bad" if bad else "all whole")
    for path, why in bad:
        logger.warning("bad image: %s %s%s", path, why,
                       " (left out: --bad-images skip)" if mode == "skip" else "")
    if bad and mode == "error":
        shown = "; ".join(f"{p} {why}" for p, why in bad[:_SHOWN])
        more = f"; and {len(bad) - _SHOWN} more (each logged above)" if len(bad) > _SHOWN else ""
        raise DatasetError(
            f"{len(bad)} of the run's {checked} images would fail to load (checked before "
            f"training): {shown}{more}; replace or remove them, or pass --bad-images skip to "
            "train without them")
    summary = {"mode": mode, "checked": checked, "seconds": round(seconds, 3),
               "skipped": len(bad) if mode == "skip" else 0,
               "files": [{"path": p, "reason": why} for p, why in bad]}
    if not bad:
        return source, target, summary
    names = {p for p, _ in bad}
    return _drop(source, names), _drop(target, names), summary


# ---------------------------------------------------------------------------- data digest

def run_data_digest(source: ReIDDataset, target: ReIDDataset) -> dict[str, Any]:
    """The digest (:func:`~edaan_fast.data.digest.records_digest`) of every split the run
    reads, kept in each checkpoint as ``data``."""
    return records_digest({f"{role} {split}": (getattr(ds, split), ds.root)
                           for role, ds in (("source", source), ("target", target))
                           for split in SPLITS})


def _identities(digest: dict[str, Any]) -> int | None:
    split = digest.get("splits", {}).get("source train")
    return None if split is None else len(set(split["pids"].tolist()))


def check_data_change(ckpt: dict[str, Any], digest: dict[str, Any], path: Path,
                      allow: bool) -> None:
    """Refuse to resume checkpoint ``ckpt`` (at ``path``) on data other than it was trained
    on, saying in one line what changed, unless ``allow`` (then a warning says it). A change
    of the source's identities is refused either way: the classifier has one output per
    identity. A checkpoint without a digest (older versions) is resumed with a note."""
    old = ckpt.get("data")
    if old is None:
        logger.info("checkpoint %s holds no data digest (an older version wrote it): the data "
                    "cannot be compared with what it was trained on", path)
        return
    if not (isinstance(old, dict) and isinstance(old.get("splits"), dict)):
        raise CheckpointError(f"checkpoint {path}: entry 'data' must be the data digest (a dict "
                              f"with 'splits'); got {type(old).__name__}")
    change = describe_change(old, digest)
    if change is None:
        return
    before, now = _identities(old), _identities(digest)
    if before != now:
        raise CheckpointError(
            f"the data changed since checkpoint {path} was written ({change}): the source "
            f"training split now has {now} identities, the checkpoint's classifier {before}, "
            "so this run cannot continue it; restore the data or start a new run")
    if not allow:
        raise CheckpointError(
            f"the data changed since checkpoint {path} was written ({change}); restore it, or "
            "pass --allow-data-change to continue on the data as they are now")
    logger.warning("resuming %s on changed data (--allow-data-change): %s", path, change)


# ---------------------------------------------------------------------------- failures

_WORKER_DIED = re.compile(r"DataLoader worker \(pids?\(?s?\)? ?(?P<pids>[\d, ]+)\) "
                          r"(?:is killed by signal: (?P<signal>[^.]+)|exited unexpectedly)")
_HINTS = {"SIGKILL": " (what the out-of-memory killer sends)",
          "SIGSEGV": " (a crash, e.g. in an image decoder)",
          "SIGBUS": " (a crash, e.g. a file changed while mapped, or /dev/shm full)"}


def defer_worker_deaths() -> None:
    """Notice a dead DataLoader worker where the trainer fetches a batch, not wherever the
    trainer happens to be: torch's ``SIGCHLD`` handler raises in the middle of a training step,
    where no checkpoint can be written; without it the loader finds the dead worker within
    5 s of waiting for its batch (``_MP_STATUS_CHECK_INTERVAL``). Takes effect if no DataLoader
    of this process has started workers yet (the main thread only)."""
    from torch.utils.data._utils import signal_handling

    if threading.current_thread() is threading.main_thread():
        signal_handling._SIGCHLD_handler_set = True


def _workers(trainer):
    """``(description, process)`` of every DataLoader worker of the trainer's loaders."""
    for name in ("source", "target"):
        loader = getattr(getattr(trainer, f"{name}_loader", None), "_loader", None)
        workers = getattr(getattr(loader, "_iterator", None), "_workers", None) or []
        for index, worker in enumerate(workers):
            yield f"worker {index} of the {name} loader", worker


def _dead_worker(trainer, pid: int | None, wait: float = 2.0):
    """``(description, pid, exit code)`` of the worker ``pid`` (any dead worker if ``None``),
    waiting up to ``wait`` s for a dying one to be reaped; ``None`` if there is none."""
    deadline = time.monotonic() + wait
    while True:
        for which, worker in _workers(trainer):
            if (pid is None or worker.pid == pid) and worker.exitcode is not None:
                return which, worker.pid, worker.exitcode
        if time.monotonic() > deadline:
            if pid is not None:
                return "a worker", pid, None
            return None
        time.sleep(0.05)


def _cause(code: int | None, description: str | None) -> str:
    """``"killed by SIGKILL (...)"`` from a worker's exit code or torch's description."""
    name = None
    if code is not None and code < 0:
        name = signal_name(-code)
    elif description:
        name = next((s.name for s in signal.Signals
                     if signal.strsignal(s) == description.strip()), description.strip())
    if name is not None:
        return f"killed by {name}{_HINTS.get(name, '')}"
    return f"exited with status {code}" if code is not None else "exited unexpectedly"


def _in_a_data_loader(exc: BaseException) -> bool:
    """Whether ``exc`` came out of a torch DataLoader's iterator (a batch that a dead worker
    was handing over fails to unpickle: ``ConnectionResetError``, ``EOFError``, ...)."""
    here = os.path.join("torch", "utils", "data")
    return any(here in f.f_code.co_filename for f, _ in traceback.walk_tb(exc.__traceback__))


def _loader_failure(trainer, exc: BaseException) -> str | None:
    """The one-line account of a dead loader worker or a failed DALI pipeline, or None."""
    if isinstance(exc, LoaderFailure):
        return str(exc)
    match = _WORKER_DIED.search(str(exc)) if isinstance(exc, RuntimeError) else None
    if match is not None:
        dead = _dead_worker(trainer, int(match["pids"].split(",")[0]))
    elif _in_a_data_loader(exc) and not isinstance(exc, DatasetError):
        dead = _dead_worker(trainer, None)
    else:
        return None
    if dead is None:
        return None
    which, pid, code = dead
    return (f"data loader {which} (pid {pid}) died: "
            f"{_cause(code, match['signal'] if match else None)}")


def _whole(trainer, exc: BaseException) -> bool:
    """Whether the training state is whole at the failure: outside a step, or in the
    trainer's fetch of a batch (the innermost trainer frame is not the step itself)."""
    if not trainer._in_step:
        return True
    here = os.path.normcase(__file__.replace("run_guard", "trainer"))
    names = [f.f_code.co_name for f, _ in traceback.walk_tb(exc.__traceback__)
             if os.path.normcase(f.f_code.co_filename) == here]
    return bool(names) and names[-1] in ("_train_epoch", "_next_target")


def stop_on_failure(trainer, exc: BaseException) -> BaseException | None:
    """For a data file that fails mid-run, a dead loader worker or a failed DALI pipeline:
    write a checkpoint (where the state is whole; one process only) and return the error to
    raise instead -- a :class:`DatasetError` or a :class:`LoaderFailure` whose one line ends
    with the ``--resume`` command. ``None`` for any other exception."""
    from edaan_fast._cli import one_line

    loader = _loader_failure(trainer, exc)
    if loader is None and not isinstance(exc, DatasetError):
        return None
    text = loader or one_line(exc)
    path = note = None
    if not trainer.dist.enabled and _whole(trainer, exc):
        try:
            path = trainer.save()
        except CheckpointError as err:
            note = f"no checkpoint could be written ({one_line(err)})"
    else:
        note = ("the last periodic checkpoint (if any) is intact" if not trainer.dist.enabled
                else "under torchrun the last periodic checkpoint (if any) is intact")
    where = f"epoch {trainer.epoch + 1}, iteration {trainer.iteration}"
    if path is not None:
        resume = f"checkpoint saved to {path} ({where}): continue with --resume {path}"
        if loader is None:
            resume += (" once the file is restored, or without it: --resume "
                       f"{path} --bad-images skip --allow-data-change")
    else:
        resume = f"stopped at {where}; {note}"
    return (LoaderFailure if loader is not None else DatasetError)(f"{text}; {resume}")
