"""MSMT17 reader (Wei et al., CVPR 2018), both releases, read the way torchreid and fast-reid
read them.

Layout::

    <root>/MSMT17_V1/list_train.txt      lines "<path relative to train/> <pid>"
    <root>/MSMT17_V1/list_val.txt        held-out images of the training identities
    <root>/MSMT17_V1/list_query.txt      lines "<path relative to test/> <pid>"
    <root>/MSMT17_V1/list_gallery.txt
    <root>/MSMT17_V1/train/0000/0000_000_01_0303morning_0015_0.jpg
    <root>/MSMT17_V1/test/0000/0000_000_01_0303morning_0036_0.jpg

The second release (faces blurred) is the same with ``MSMT17_V2/``, ``mask_train_v2/`` and
``mask_test_v2/``. ``<root>`` may also be the ``MSMT17_V*`` folder itself or a folder holding
``msmt17/MSMT17_V*``. When both releases are present, V1 is read unless ``version="V2"``.

Labels: the pid is the list file's second field; the camera is the third ``_``-separated field
of the file name (``<pid>_<index>_<camera>_<date><time>_...``, cameras 1..15), made 0-based.
Training pids are relabelled ``0..n-1`` (they already are in the release: 1,041 identities);
query and gallery keep the list files' pids (3,060 test identities), which never meet the
training ones. As in torchreid and fast-reid, ``list_val.txt`` is left out of training unless
``with_val=True`` (train + val = the 32,621 training images the MSMT17 paper counts).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .base import DatasetError, Record, ReIDDataset, find_root, relabel, require_files

logger = logging.getLogger(__name__)

MSMT17_LAYOUT = """  <root>/MSMT17_V1/          (or <root>/MSMT17_V2/, <root>/msmt17/MSMT17_V*/)
    list_train.txt  list_val.txt      "<path under train/> <pid>" per line
    list_query.txt  list_gallery.txt  "<path under test/> <pid>" per line
    train/0000/0000_000_01_0303morning_0015_0.jpg   <pid>_<index>_<camera>_<date+time>_...
    test/0000/0000_000_01_0303morning_0036_0.jpg
  MSMT17_V2 names its image folders mask_train_v2/ and mask_test_v2/"""

#: release folder -> (training image folder, test image folder)
VERSIONS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
LIST_FILES = {"train": "list_train.txt", "val": "list_val.txt", "query": "list_query.txt",
              "gallery": "list_gallery.txt"}
LINE_PATTERN = re.compile(r"^(\S+)\s+(-?\d+)$")
NAME_PATTERN = re.compile(r"^(\d+)_(\d+)_(\d+)_")


def _locate(root: str | Path, version: str | None) -> tuple[Path, str]:
    """The release folder under ``root`` and which release it is."""
    root = find_root(root, ("",), (), MSMT17_LAYOUT)  # a missing root or a file: its errors
    for ver in [version] if version else list(VERSIONS):
        train_dir, test_dir = VERSIONS[ver]
        folder = f"MSMT17_{ver}"
        for cand in ("", folder, f"msmt17/{folder}", f"MSMT17/{folder}"):
            base = root / cand if cand else root
            if not ((base / train_dir).is_dir() or (cand and base.is_dir())):
                continue
            needed = (train_dir, test_dir, *LIST_FILES.values())
            missing = [n for n in needed if not (base / n).exists()]
            if missing:
                raise DatasetError(f"msmt17: {base} lacks {', '.join(missing)}\n"
                                   f"expected layout:\n{MSMT17_LAYOUT}")
            return base, ver
    present = sorted(p.name for p in root.iterdir())[:20]
    which = f"MSMT17_{version}" if version else "MSMT17_V1 or MSMT17_V2"
    raise DatasetError(f"msmt17: no {which} release found under {root}; found entries "
                       f"{present}\nexpected layout:\n{MSMT17_LAYOUT}")


def _read_list(list_path: Path, image_dir: Path) -> list[Record]:
    """The records one list file names, their images under ``image_dir``."""
    try:
        lines = list_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"msmt17: cannot read {list_path} ({exc})") from None
    records = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        match = LINE_PATTERN.match(line)
        if match is None:
            raise DatasetError(f"msmt17: {list_path} line {number}: expected '<image path> "
                               f"<pid>', got {line!r}")
        rel, pid = match.group(1), int(match.group(2))
        name = NAME_PATTERN.match(Path(rel).name)
        if name is None or int(name.group(3)) < 1 or pid < 0:
            raise DatasetError(
                f"msmt17: {list_path} line {number}: cannot take a pid >= 0 and a camera >= 1 "
                f"from {line!r} (expected e.g. '0000/0000_000_01_0303morning_0015_0.jpg 0': "
                f"<pid>_<index>_<camera>_...)")
        records.append(Record(str(image_dir / rel), pid, int(name.group(3)) - 1))
    if not records:
        raise DatasetError(f"msmt17: {list_path} lists no images")
    require_files(records, f"msmt17: of the {len(records)} images {list_path} lists,")
    return records


def msmt17(root: str | Path, with_val: bool = False, version: str | None = None) -> ReIDDataset:
    """Read MSMT17 (see the module docstring).

    Args:
        root: the folder holding ``MSMT17_V1/`` or ``MSMT17_V2/`` (or that folder itself).
        with_val: train on ``list_train.txt`` + ``list_val.txt`` (default: the first only).
        version: ``"V1"`` or ``"V2"`` (default: whichever is present, V1 first).
    """
    if version is not None and version not in VERSIONS:
        raise ValueError(f"msmt17: version must be one of {tuple(VERSIONS)}, got {version!r}")
    base, version = _locate(root, version)
    train_dir, test_dir = (base / d for d in VERSIONS[version])
    splits = {split: _read_list(base / name, train_dir if split in ("train", "val") else test_dir)
              for split, name in LIST_FILES.items()}
    train = splits["train"] + (splits["val"] if with_val else [])
    dataset = ReIDDataset("msmt17", base.resolve(), relabel(train), splits["query"],
                          splits["gallery"], info={"version": version, "with_val": with_val})
    logger.info("loaded %r", dataset)
    return dataset
