"""A digest of the record lists a run reads, kept in its checkpoints, so that a resume can say
in one line what changed in the data since (files added or removed, labels changed,
identities gained or lost) instead of continuing silently on other data.

Per split (``"source train"``, ``"target gallery"``, ...): an 8-byte hash of each file's path
relative to its data set's root (so a data set moved to another folder is the same data), its
identity and camera labels, in path order, and one SHA-256 over all of it. Market-1501's
36,036 records take about 0.9 MB as int64 tensors in the checkpoint and a few hundredths of a
second to hash.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .base import Record

__all__ = ["DIGEST_VERSION", "describe_change", "records_digest"]

DIGEST_VERSION = 1


def _relative(path: str, root: Path | None) -> str:
    if root is not None:
        try:
            return os.path.relpath(path, root)
        except ValueError:  # another drive
            pass
    return path


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little",
                          signed=True)


def _split_digest(records: Sequence[Record], root: Path | None) -> dict[str, Any]:
    rows = sorted((_relative(r.path, root), int(r.pid), int(r.camid)) for r in records)
    total = hashlib.sha256()
    for name, pid, camid in rows:
        total.update(f"{name}\0{pid}\0{camid}\n".encode())
    return {"sha256": total.hexdigest(),
            "files": torch.tensor([_hash(name) for name, _, _ in rows], dtype=torch.int64),
            "pids": torch.tensor([pid for _, pid, _ in rows], dtype=torch.int64),
            "camids": torch.tensor([camid for _, _, camid in rows], dtype=torch.int64)}


def records_digest(splits: Mapping[str, tuple[Sequence[Record], Path | None]]) -> dict[str, Any]:
    """The digest of ``{split name: (records, data set root)}`` (checkpoint data: tensors,
    strings, numbers)."""
    return {"version": DIGEST_VERSION,
            "splits": {name: _split_digest(records, None if root is None else Path(root))
                       for name, (records, root) in splits.items()}}


def _labels(split: dict[str, Any]) -> dict[int, tuple[int, int]]:
    return {int(h): (int(p), int(c)) for h, p, c in zip(split["files"].tolist(),
                                                         split["pids"].tolist(),
                                                         split["camids"].tolist())}


def _split_change(name: str, old: dict[str, Any] | None, new: dict[str, Any] | None) -> str:
    if old is None or new is None:
        return f"{name}: {'added' if old is None else 'no longer read'}"
    before, after = _labels(old), _labels(new)
    removed = len(before.keys() - after.keys())
    added = len(after.keys() - before.keys())
    relabelled = sum(before[h] != after[h] for h in before.keys() & after.keys())
    ids_before, ids_after = len(set(old["pids"].tolist())), len(set(new["pids"].tolist()))
    parts = [f"{n} file{'s' * (n != 1)} {what}" for n, what in
             ((removed, "removed"), (added, "added"), (relabelled, "relabelled")) if n]
    if ids_before != ids_after:
        parts.append(f"identities {ids_before} -> {ids_after}")
    return f"{name}: {', '.join(parts) or 'file order changed'}"


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """What changed from digest ``old`` (a checkpoint's) to ``new`` (the data now), as one
    line (``"source train: 3 files removed; target gallery: 1 file added"``), or ``None`` if
    nothing did."""
    a, b = old.get("splits", {}), new.get("splits", {})
    changed = [_split_change(name, a.get(name), b.get(name))
               for name in [*a, *(n for n in b if n not in a)]
               if a.get(name, {}).get("sha256") != b.get(name, {}).get("sha256")]
    return "; ".join(changed) or None
