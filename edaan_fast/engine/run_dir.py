"""A run's output folder: the names of the files a run writes, the rule that a fresh run never
replaces another run's results unless told to (``overwrite``), and preparing the folder
(creation, the replaced run's files, temporaries a killed checkpoint write left, the resolved
``config.yaml``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .checkpoint import remove_stale_temporaries
from .run_config import RunConfigError

logger = logging.getLogger("edaan_fast.engine.trainer")

__all__ = ["CHECKPOINT_NAME", "FINAL_NAME", "OVERWRITTEN_FILES", "RUN_FILES", "TRANSLATED_DIR",
           "TRANSLATOR_NAME", "check_output_dir", "nearest_existing", "prepare_output_dir",
           "write_config"]

CHECKPOINT_NAME = "checkpoint.pt"
FINAL_NAME = "final.pt"
TRANSLATOR_NAME = "translator.pt"
TRANSLATED_DIR = "translated"
#: The files that make an output folder hold a run: a fresh run never replaces them unless
#: told to (``overwrite``), since ``final.pt`` is the result of a finished run.
RUN_FILES = (CHECKPOINT_NAME, FINAL_NAME, TRANSLATOR_NAME)
#: What ``overwrite`` deletes before a fresh run starts (so a folder never mixes two runs).
OVERWRITTEN_FILES = RUN_FILES + ("report.json", "report.md")


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists: what decides whether an output that is
    created if missing can be created (it cannot under a file)."""
    existing = Path(path)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    return existing


def check_output_dir(folder: Path, resume: str | os.PathLike | None, overwrite: bool,
                      runs: bool = True) -> None:
    """Refuse an output folder that cannot be one, or (``runs``) that holds a run this one
    would replace.

    A fresh run needs ``overwrite`` to write into a folder holding :data:`RUN_FILES`; a
    resumed run may write into the folder of the checkpoint it resumes, and needs
    ``overwrite`` for another folder holding a run.
    """
    existing = nearest_existing(folder)
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == folder else f"is under {existing}, which is a file"
        raise RunConfigError(f"output_dir {folder} {what}; expected a folder (it is created if "
                             "missing)")
    if overwrite or not runs or not folder.is_dir():
        return
    found = [name for name in RUN_FILES if (folder / name).exists()]
    if not found:
        return
    if resume is not None:
        if Path(resume).resolve().parent == folder.resolve():
            return
        raise RunConfigError(
            f"output_dir {folder} holds another run ({', '.join(found)}), which resuming "
            f"{resume} there would replace: pass --output-dir {Path(resume).parent} (the "
            "checkpoint's own folder) or another folder, or --overwrite to replace it")
    ckpt = folder / (CHECKPOINT_NAME if CHECKPOINT_NAME in found else found[0])
    raise RunConfigError(
        f"output_dir {folder} already holds a run ({', '.join(found)}); a new run would replace "
        f"it: continue it with --resume {ckpt}, start over with --overwrite (deletes "
        f"{', '.join(found)}), or choose another --output-dir")


def prepare_output_dir(folder: Path, overwrite: bool) -> None:
    """Create the output folder; delete the replaced run's files (``overwrite``) and the
    temporaries of checkpoint writes that a killed process never finished."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunConfigError(f"output_dir {folder} cannot be created: "
                             f"{exc.strerror or exc}") from None
    if overwrite:
        for name in OVERWRITTEN_FILES:
            (folder / name).unlink(missing_ok=True)
    for stale in remove_stale_temporaries(folder):
        logger.info("removed %s, left by an interrupted checkpoint write", stale)


def write_config(folder: Path, run: dict[str, Any]) -> None:
    """The resolved run configuration as ``config.yaml`` (written atomically)."""
    import yaml

    text = yaml.safe_dump(run, sort_keys=False)
    tmp = folder / f".config.yaml.tmp{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, folder / "config.yaml")
