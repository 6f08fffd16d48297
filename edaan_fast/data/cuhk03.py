"""CUHK03 reader (Li et al., CVPR 2014) from the release's ``cuhk-03.mat``.

Layout::

    <root>/cuhk03_release/cuhk-03.mat                       MATLAB v7.3 (HDF5), read with h5py
    <root>/cuhk03_new_protocol_config_{labeled,detected}.mat  optional, 767/700 split

The .mat holds two cell arrays, ``labeled`` (hand-drawn boxes) and ``detected`` (DPM boxes),
each with one cell per camera pair (5 pairs); a pair's cell is an ``n_persons x 10`` cell of
RGB images (columns 1-5 = first view, 6-10 = second view; empty cells = missing image), and
``testsets``: 20 cells of ``100 x 2`` ``[pair, person]`` rows, the classic test identities.

On first use the images are written out once as PNG to ``<root>/images_<type>/`` named
``<pair>_<person:03d>_<view>_<index:02d>.png`` (the names torchreid and the new-protocol
config files use); a marker file written last makes an interrupted export start over.

Protocols (``protocol=``):

- ``"classic"`` (the EDAAN paper's: 1,367 training / 100 test identities): the test identities
  are ``testsets[split_id]`` (20 splits); every other identity trains. As in torchreid, query
  and gallery are both the test images; the evaluator's same-identity-same-camera rule leaves
  each query only the other view to match.
- ``"new"`` (Zhong et al., CVPR 2017: 767 / 700 identities): read from the official
  ``cuhk03_new_protocol_config_<type>.mat`` when present (scipy needed for that MATLAB v5
  file). Without it the split is *derived* deterministically: the identities, in file order, are
  permuted with ``numpy.random.default_rng(0)``; the last ``round(n * 700 / 1467)`` (700 for the
  full set) are test identities; of each, one image per view is a query and the rest form the
  gallery. A derived split is not the official one: numbers from it are not comparable with
  published results, and a warning says so.

camid is the view within the pair (0 or 1), as in torchreid.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from edaan_fast._progress import progress_bar

from .base import DatasetError, Record, ReIDDataset, find_root, relabel

logger = logging.getLogger(__name__)

CUHK03_LAYOUT = """  <root>/cuhk03_release/cuhk-03.mat        (MATLAB v7.3: 'labeled', 'detected', 'testsets')
  <root>/cuhk03_new_protocol_config_labeled.mat, ..._detected.mat   (optional, 767/700 split)"""

IMAGE_TYPES = ("labeled", "detected")
PROTOCOLS = ("classic", "new")
NAME_PATTERN = re.compile(r"^(\d)_(\d{3})_(\d)_(\d{2})\.png$")
CACHE_VERSION = 1


def _import_h5py():
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading CUHK03's cuhk-03.mat (MATLAB v7.3) needs h5py: "
                          "pip install h5py") from exc
    return h5py


def _export_images(mat_path: Path, image_type: str, out_dir: Path) -> list:
    """Write every image of ``image_type`` as PNG; return ``[[pair, person, [names]], ...]``."""
    h5py = _import_h5py()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = []
    try:
        mat = h5py.File(mat_path, "r")
    except OSError as exc:
        raise DatasetError(f"cannot open {mat_path} as MATLAB v7.3/HDF5 ({exc})\n"
                           f"expected layout:\n{CUHK03_LAYOUT}") from exc
    with mat:
        if image_type not in mat or "testsets" not in mat:
            raise DatasetError(f"{mat_path} lacks '{image_type}' or 'testsets' "
                               f"(found {sorted(mat.keys())})\nexpected layout:\n{CUHK03_LAYOUT}")
        pairs = mat[image_type][0]
        total = sum(mat[ref].shape[-1] for ref in pairs)
        with progress_bar(total=total, desc=f"CUHK03 {image_type} -> PNG", unit="id") as bar:
            for pair_index, pair_ref in enumerate(pairs):
                cells = mat[pair_ref][:].T  # [n_persons, 10] object references
                for person in range(cells.shape[0]):
                    names = []
                    for index, img_ref in enumerate(cells[person]):
                        img = mat[img_ref][:].T  # MATLAB HxWx3, stored transposed
                        if img.ndim != 3 or img.size == 0:
                            continue  # empty cell: that view has fewer images
                        view = 1 if index < 5 else 2
                        name = f"{pair_index + 1}_{person + 1:03d}_{view}_{index + 1:02d}.png"
                        Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(
                            out_dir / name)
                        names.append(name)
                    meta.append([pair_index + 1, person + 1, names])
                    bar.update(1)
    return meta


def _load_meta(base: Path, mat_path: Path, image_type: str) -> tuple[Path, list]:
    img_dir = base / f"images_{image_type}"
    marker = img_dir / ".complete.json"
    if marker.is_file():
        data = json.loads(marker.read_text())
        if data.get("version") == CACHE_VERSION:
            return img_dir, data["meta"]
    logger.info("exporting CUHK03 %s images from %s to %s (once)", image_type, mat_path, img_dir)
    meta = _export_images(mat_path, image_type, img_dir)
    tmp = marker.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "meta": meta}))
    os.replace(tmp, marker)  # written last: a half export has no marker
    return img_dir, meta


def _read_testsets(mat_path: Path) -> list[set[tuple[int, int]]]:
    h5py = _import_h5py()
    with h5py.File(mat_path, "r") as mat:
        return [{(int(a), int(b)) for a, b in mat[ref][:].T} for ref in mat["testsets"][0]]


def _view(name: str) -> int:
    return int(name.split("_")[2]) - 1


def _classic(img_dir: Path, meta: list, test_ids: set) -> tuple[list, list]:
    train, test = [], []
    for gid, (pair, person, names) in enumerate(meta, start=1):
        dest = test if (pair, person) in test_ids else train
        dest.extend(Record(str(img_dir / n), gid, _view(n)) for n in names)
    return train, test


def _new_from_config(img_dir: Path, config: Path) -> tuple[list, list, list]:
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {config} (MATLAB v5) needs scipy: pip install scipy") from exc
    cfg = loadmat(config)
    labels = cfg["labels"].flatten()
    files = [str(np.asarray(f).flatten()[0]) for f in cfg["filelist"].flatten()]

    def take(key):
        return [Record(str(img_dir / files[i]), int(labels[i]), _view(files[i]))
                for i in cfg[key].flatten().astype(np.int64) - 1]

    return take("train_idx"), take("query_idx"), take("gallery_idx")


def _new_derived(img_dir: Path, meta: list) -> tuple[list, list, list]:
    n = len(meta)
    num_test = 700 if n == 1467 else max(1, round(n * 700 / 1467))
    order = np.random.default_rng(0).permutation(n)
    test_set = set(order[n - num_test:].tolist())
    rng = np.random.default_rng(1)
    train, query, gallery = [], [], []
    for gid, (_, _, names) in enumerate(meta):
        recs = [Record(str(img_dir / nm), gid + 1, _view(nm)) for nm in names]
        if gid not in test_set:
            train.extend(recs)
            continue
        for view in (0, 1):
            views = [r for r in recs if r.camid == view]
            if not views:
                continue
            pick = int(rng.integers(len(views)))
            query.append(views[pick])
            gallery.extend(r for i, r in enumerate(views) if i != pick)
    return train, query, gallery


def cuhk03(root: str | Path, image_type: str = "detected", protocol: str = "classic",
           split_id: int = 0) -> ReIDDataset:
    """Read CUHK03 and build one of its protocols (see the module docstring).

    Args:
        root: folder holding ``cuhk03_release/cuhk-03.mat``.
        image_type: ``"detected"`` (DPM boxes) or ``"labeled"`` (hand-drawn boxes).
        protocol: ``"classic"`` (1,367/100, 20 splits) or ``"new"`` (767/700).
        split_id: which of the classic protocol's splits (0-based); must be 0 for ``"new"``.
    """
    if image_type not in IMAGE_TYPES:
        raise ValueError(f"cuhk03: image_type must be one of {IMAGE_TYPES}, got {image_type!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"cuhk03: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    base = find_root(root, ("", "cuhk03"), ("cuhk03_release/cuhk-03.mat",), CUHK03_LAYOUT)
    mat_path = base / "cuhk03_release" / "cuhk-03.mat"
    img_dir, meta = _load_meta(base, mat_path, image_type)
    info = {"image_type": image_type, "protocol": protocol, "split_id": split_id}

    if protocol == "classic":
        testsets = _read_testsets(mat_path)
        if not 0 <= split_id < len(testsets):
            raise ValueError(f"cuhk03: split_id must be in [0, {len(testsets)}) for the classic "
                             f"protocol, got {split_id}")
        train, test = _classic(img_dir, meta, testsets[split_id])
        query, gallery = test, list(test)
    else:
        if split_id != 0:
            raise ValueError(f"cuhk03: the new protocol has one split, got split_id={split_id}")
        name = f"cuhk03_new_protocol_config_{image_type}.mat"
        config = next((p for p in (base / name, base / "cuhk03_release" / name) if p.is_file()),
                      None)
        if config is not None:
            train, query, gallery = _new_from_config(img_dir, config)
            info["split_source"] = "official"
        else:
            logger.warning("cuhk03: %s not found under %s; deriving the 767/700 split "
                           "deterministically (not the official split: results are not "
                           "comparable with published numbers)", name, base)
            train, query, gallery = _new_derived(img_dir, meta)
            info["split_source"] = "derived"
    if not train or not query or not gallery:
        raise DatasetError(f"cuhk03: empty split under {base} (train={len(train)}, "
                           f"query={len(query)}, gallery={len(gallery)})")
    dataset = ReIDDataset("cuhk03", base, relabel(train), query, gallery, info=info)
    logger.info("loaded %r", dataset)
    return dataset
