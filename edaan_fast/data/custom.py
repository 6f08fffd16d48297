"""The reader of a user's own data set (registry name ``custom``): a folder of images whose file
names carry the labels, or a CSV file that lists them.

A folder (``root`` = the folder)::

    <root>/train/0001_0_000123.jpg      <pid>_<camid>[_<anything>].jpg|.jpeg|.png
    <root>/query/0101_1_000007.jpg      camid 0-based; pid -1 = junk (dropped)
    <root>/gallery/0101_0_000042.jpg

A CSV file (``root`` = the ``.csv`` file)::

    path,pid,camid,split                 the header is optional; with it, columns may come in
    train/a.jpg,1,0,train                any order. Paths are relative to the CSV's folder (or
    /data/b.jpg,101,1,query              absolute); split is train, query or gallery.

Without a ``split`` column a row's split is the first folder of its path (``train/``,
``query/`` or ``gallery/``). A split may be absent: a set that is only evaluated needs query
and gallery, a source set only train (a run refuses a set without training images, the
evaluation one without query or gallery images). Training pids are relabelled ``0..n-1``;
query and gallery keep theirs, so one person must carry the same pid in both.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

from .base import DatasetError, Record, ReIDDataset, find_root, relabel, require_files
from .market_layout import read_split

logger = logging.getLogger(__name__)

CUSTOM_LAYOUT = """  <root>/train/0001_0_000123.jpg     <pid>_<camid>[_<anything>].jpg
  <root>/query/0101_1_000007.jpg     (camid 0-based; pid -1 = junk, dropped)
  <root>/gallery/0101_0_000042.jpg   a split may be absent
or <root> = a .csv file of rows path,pid,camid[,split] (split: train, query or gallery;
without it, the first folder of each path)"""

NAME_PATTERN = re.compile(r"^(-?\d+)_(\d+)(?:_.*)?\.\w+$")
SPLITS = ("train", "query", "gallery")
COLUMNS = ("path", "pid", "camid", "split")


def _from_folder(base: Path) -> dict[str, list[Record]]:
    if not any((base / s).is_dir() for s in SPLITS):
        present = sorted(p.name for p in base.iterdir())[:20]
        raise DatasetError(f"custom: {base} holds none of {', '.join(s + '/' for s in SPLITS)}"
                           f"; found entries {present}\nexpected layout:\n{CUSTOM_LAYOUT}")
    return {s: read_split(base / s, NAME_PATTERN, CUSTOM_LAYOUT, first_camera=0)
            if (base / s).is_dir() else [] for s in SPLITS}


def _columns(first: list[str], where: str) -> tuple[dict[str, int], bool]:
    """Column indices of the CSV and whether ``first`` is a header row."""
    names = [c.strip().lower() for c in first]
    if "pid" in names or "path" in names:
        unknown = sorted(set(names) - set(COLUMNS))
        missing = [c for c in COLUMNS[:3] if c not in names]
        if unknown or missing or len(set(names)) != len(names):
            raise DatasetError(f"{where}: header {first} must name path, pid, camid and "
                               f"optionally split, each once")
        return {c: names.index(c) for c in names}, True
    if len(first) not in (3, 4):
        raise DatasetError(f"{where} line 1: expected 3 or 4 comma-separated fields "
                           f"path,pid,camid[,split], got {len(first)}: {first}")
    return {c: i for i, c in enumerate(COLUMNS[:len(first)])}, False


def _row(fields: list[str], cols: dict[str, int], folder: Path, where: str) -> tuple[str, Record]:
    """``(split, record)`` of one CSV row."""
    if len(fields) != len(cols):
        raise DatasetError(f"{where}: expected {len(cols)} fields ({','.join(cols)}), "
                           f"got {len(fields)}: {fields}")
    path = fields[cols["path"]].strip()
    try:
        pid, camid = int(fields[cols["pid"]]), int(fields[cols["camid"]])
    except ValueError:
        raise DatasetError(f"{where}: pid and camid must be integers, got "
                           f"{fields[cols['pid']]!r} and {fields[cols['camid']]!r}") from None
    if pid < -1 or camid < 0:
        raise DatasetError(f"{where}: pid must be >= -1 (-1 = junk) and camid >= 0 (0-based), "
                           f"got pid={pid}, camid={camid}")
    if "split" in cols:
        split = fields[cols["split"]].strip().lower()
    else:
        split = Path(path).parts[0] if len(Path(path).parts) > 1 else ""
    if split not in SPLITS:
        told = "split" if "split" in cols else "the first folder of the path (no split column)"
        raise DatasetError(f"{where}: {told} must be one of {', '.join(SPLITS)}, got "
                           f"{split!r} ({path})")
    return split, Record(str(folder / path), pid, camid)


def _from_csv(csv_path: Path) -> dict[str, list[Record]]:
    try:
        with open(csv_path, newline="") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), start=1)
                    if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"custom: cannot read {csv_path} ({exc})") from None
    if not rows:
        raise DatasetError(f"custom: {csv_path} is empty; expected rows path,pid,camid[,split]")
    cols, header = _columns(rows[0][1], f"custom: {csv_path}")
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for number, fields in rows[1:] if header else rows:
        split, record = _row(fields, cols, csv_path.parent, f"custom: {csv_path} line {number}")
        if record.pid != -1:
            splits[split].append(record)
    require_files([r for s in SPLITS for r in splits[s]],
                  f"custom: of the images {csv_path} lists,")
    return splits


def custom(root: str | Path) -> ReIDDataset:
    """Read a user's own data set from a folder or a CSV file (see the module docstring)."""
    path = Path(root).expanduser()
    if path.suffix.lower() == ".csv" or path.is_file():
        if not path.is_file():
            raise DatasetError(f"custom: CSV file not found: {path}\nexpected layout:\n"
                               f"{CUSTOM_LAYOUT}")
        if path.suffix.lower() != ".csv":
            raise DatasetError(f"custom: {path} is a file but not a .csv; expected a folder or "
                               f"a CSV file laid out as:\n{CUSTOM_LAYOUT}")
        base = path.absolute()  # relative paths: from the folder the CSV is seen in
        splits = _from_csv(base)
    else:
        base = find_root(path, ("",), (), CUSTOM_LAYOUT)
        splits = _from_folder(base)
    if not any(splits.values()):
        raise DatasetError(f"custom: {base} lists no images but junk (pid -1)")
    dataset = ReIDDataset("custom", base, relabel(splits["train"]), splits["query"],
                          splits["gallery"])
    logger.info("loaded %r", dataset)
    return dataset
