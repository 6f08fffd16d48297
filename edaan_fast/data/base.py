"""Core data types shared by every reader: :class:`Record`, :class:`ReIDDataset`,
:class:`DatasetError`, the image helpers that report a bad file by its path, and
:func:`install_folder` for caches that several processes may write at once."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DatasetError(ValueError):
    """A data set is missing, laid out differently than expected, or holds a bad file.

    The message always names the offending path and what was expected there.
    """


class Record(NamedTuple):
    """One image of a re-ID split.

    Attributes:
        path: absolute path of the image file.
        pid: person identity. Training splits are relabelled to ``0..n-1``; query and
            gallery keep the data set's own ids (``0`` = Market-style distractor).
        camid: 0-based camera index.
    """

    path: str
    pid: int
    camid: int


def _count(records: Sequence[Record]) -> tuple[int, int, int]:
    return (
        len({r.pid for r in records}),
        len(records),
        len({r.camid for r in records}),
    )


@dataclass
class ReIDDataset:
    """A re-ID data set: a labelled training split plus a query/gallery test split.

    Attributes:
        name: registry name (``"market1501"``, ...).
        root: the folder the records were read from.
        train: training records, pids relabelled to ``0..num_train_pids-1``.
        query: query records (original pids).
        gallery: gallery records (original pids; may hold distractors).
        info: free-form extras of the reader (protocol, split id, direction, ...).
    """

    name: str
    root: Path
    train: list[Record]
    query: list[Record]
    gallery: list[Record]
    info: dict = field(default_factory=dict)

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})

    @property
    def num_query_pids(self) -> int:
        return len({r.pid for r in self.query})

    @property
    def num_gallery_pids(self) -> int:
        return len({r.pid for r in self.gallery})

    def verify(self, splits: Iterable[str] = ("train", "query", "gallery")) -> None:
        """Decode every image of ``splits``; raise :class:`DatasetError` listing the bad ones."""
        bad = []
        for split in splits:
            for rec in getattr(self, split):
                try:
                    read_image(rec.path)
                except DatasetError as exc:
                    bad.append(str(exc))
        if bad:
            head = "\n  ".join(bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise DatasetError(
                f"{self.name}: {len(bad)} unreadable image(s) under {self.root}:\n  {head}{more}"
            )

    def __repr__(self) -> str:
        rows = [("train", *_count(self.train)), ("query", *_count(self.query)),
                ("gallery", *_count(self.gallery))]
        extra = ", ".join(f"{k}={v}" for k, v in self.info.items())
        lines = [f"ReIDDataset({self.name!r}, root={str(self.root)!r}"
                 + (f", {extra}" if extra else "") + ")",
                 "  subset   | # ids | # images | # cameras"]
        lines += [f"  {n:<8} | {p:5d} | {i:8d} | {c:9d}" for n, p, i, c in rows]
        return "\n".join(lines)


def _open(path: str | Path, what: str, mode: str) -> Image.Image:
    """``Image.open(path).convert(mode)``, every failure a :class:`DatasetError` naming the
    file: missing, a broken symbolic link, undecodable, or larger than Pillow's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``)."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise DatasetError(f"{what} {path} is a broken symbolic link (to "
                               f"{os.readlink(path)})") from exc
        raise DatasetError(f"{what} file not found: {path}") from exc
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{what} {path} is too large to decode ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"corrupt or unreadable {what}: {path} ({exc})") from exc


def read_image(path: str | Path) -> Image.Image:
    """Open an image as RGB; a missing, undecodable or oversized file raises
    :class:`DatasetError`."""
    return _open(path, "image", "RGB")


def read_mask(path: str | Path) -> np.ndarray:
    """Read an 8-bit single-channel mask as float32 ``[H, W]`` in ``[0, 1]``."""
    return np.asarray(_open(path, "mask", "L"), dtype=np.float32) / 255.0


def relabel(records: Sequence[Record]) -> list[Record]:
    """Map the pids of ``records`` to ``0..n-1`` in sorted order of the original pids."""
    mapping = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [Record(r.path, mapping[r.pid], r.camid) for r in records]


def require_files(records: Sequence[Record], what: str) -> None:
    """Raise :class:`DatasetError` when an image ``records`` name does not exist; ``what``
    opens the message (e.g. ``"custom: of the 40 images data.csv lists,"``)."""
    missing = [r.path for r in records if not os.path.isfile(r.path)]
    if missing:
        raise DatasetError(f"{what} {len(missing)} do not exist, e.g. {missing[0]}")


def find_root(root: str | Path, candidates: Sequence[str], required: Sequence[str],
              layout: str) -> Path:
    """Return the first of ``root/<candidate>`` that holds every entry of ``required``.

    Raises :class:`DatasetError` naming the folders tried and the expected ``layout``.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"data set root does not exist: {root}\nexpected layout:\n{layout}")
    if not root.is_dir():
        raise DatasetError(f"data set root {root} is a file; expected a folder laid out as:\n"
                           f"{layout}")
    tried = []
    for cand in candidates:
        base = root / cand if cand else root
        tried.append(str(base))
        if all((base / req).exists() for req in required):
            return base.resolve()
    present = sorted(p.name for p in root.iterdir())[:20]
    raise DatasetError(
        f"no data set found under {root}: none of [{', '.join(tried)}] contains "
        f"{', '.join(required)}; found entries {present}\nexpected layout:\n{layout}"
    )


def list_images(folder: Path) -> list[Path]:
    """Image files (``.jpg``/``.jpeg``/``.png``) of ``folder``, sorted; others are skipped.

    Raises:
        DatasetError: ``folder`` is not a folder, or an entry named like an image is a
            symbolic link whose target does not exist (a data set copied without its files).
    """
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise DatasetError(f"cannot list {folder}: {exc.strerror or exc}") from None
    broken = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_symlink()
              and not p.exists()]
    if broken:
        raise DatasetError(
            f"{len(broken)} image(s) in {folder} are broken symbolic links, e.g. {broken[0]} -> "
            f"{os.readlink(broken[0])} (its target does not exist)")
    files = [p for p in entries if p.is_file()]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = len(files) - len(images)
    if skipped:
        logger.debug("%s: skipped %d non-image file(s)", folder, skipped)
    return images


def install_folder(tmp: Path, final: Path, keep: Callable[[Path], bool] = lambda _: False) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing what is there.

    Safe when other processes install the same folder at the same time (one render per DDP
    rank, parallel benchmark runs): a folder at ``final`` for which ``keep(final)`` holds
    (another process's complete copy) is kept and ``tmp`` discarded; anything else is renamed
    aside first, an atomic step only one process can win, and then removed; and when another
    process installs its copy between that step and ours, ``os.replace`` refuses to overwrite
    it and that copy is kept if ``keep`` accepts it.
    """
    if keep(final):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = final.with_name(f".{final.name}.old{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(final, aside)
    except FileNotFoundError:  # nothing there, or another process moved it first
        pass
    else:
        logger.info("replacing %s", final)
    shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:  # a non-empty folder appeared at ``final`` in the meantime
        if not keep(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
