"""Feature-level evaluation and the features file: owns :class:`Features` (one split's
features and ids), the query/gallery checks, :func:`distance_matrix` (plain or k-reciprocal
re-ranked), :func:`evaluate_features` / :func:`evaluate_prid2011` (which protocol function
ranks a pair), and the ``.npz`` features file format of ``--export-features``.

Protocol names (:data:`PROTOCOLS`):

* ``"market"`` -- Market-1501 / DukeMTMC-reID single query (also the synthetic set and
  CUHK03's 767/700 split), :func:`~edaan_fast.metrics.protocols.market_duke`;
* ``"cuhk03"`` -- CUHK03 1,367/100 single-gallery-shot CMC averaged over ``repeats`` draws,
  :func:`~edaan_fast.metrics.protocols.cuhk03_single_gallery_shot`;
* ``"prid2011"`` -- PRID2011 cam_a -> cam_b and cam_b -> cam_a, :func:`evaluate_prid2011`.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # the protocols (and the ops they rank with) load when a pair is ranked
    from .protocols import ProtocolResult

__all__ = [
    "FEATURES_FORMAT", "FEATURES_VERSION", "PROTOCOLS", "PRID_TASKS", "EvaluationError",
    "FeatureMismatchError", "Features", "ReRanking", "distance_matrix", "evaluate_features",
    "evaluate_prid2011", "evaluate_tasks", "load_features", "reranked_rows", "save_features",
]

FEATURES_FORMAT = "edaan_fast.features"
FEATURES_VERSION = 1
#: PRID2011's two query/gallery pairs: (task name, the table's column label).
PRID_TASKS = (("a2b", "cam1/cam2"), ("b2a", "cam2/cam1"))


class EvaluationError(Exception):
    """A problem with the inputs: reported as one line on stderr, exit code 2."""


PROTOCOLS = ("market", "cuhk03", "prid2011")


class FeatureMismatchError(ValueError):
    """Query and gallery features (or their ids) do not belong together."""


@dataclass
class Features:
    """Features of one split: ``features`` float32 ``[N, D]`` (CPU), ``pids``/``camids`` int64
    ``[N]``, and (when known) the image ``paths`` in the same order."""

    features: torch.Tensor
    pids: torch.Tensor
    camids: torch.Tensor
    paths: list[str] | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def check(self, name: str) -> None:
        """Raises :class:`FeatureMismatchError` unless features are ``[N, D]`` with ``N`` ids."""
        f = self.features
        if f.dim() != 2:
            raise FeatureMismatchError(
                f"{name} features must be 2-D [N, D], got shape {list(f.shape)}")
        n = f.shape[0]
        for what, ids in (("pids", self.pids), ("camids", self.camids)):
            if ids.dim() != 1 or ids.shape[0] != n:
                raise FeatureMismatchError(
                    f"{name} {what} must be 1-D with one entry per feature row ({n}), got shape "
                    f"{list(ids.shape)}")
        if self.paths is not None and len(self.paths) != n:
            raise FeatureMismatchError(
                f"{name} paths must have one entry per feature row ({n}), got {len(self.paths)}")


@dataclass(frozen=True)
class ReRanking:
    """k-reciprocal re-ranking settings (Zhong et al., CVPR 2017; their defaults).

    Attributes:
        k1: size of the k-reciprocal neighbourhood ``R(p, k1)``.
        k2: local query expansion over ``N(p, k2)`` (1 turns it off).
        lambda_value: weight of the original distance in ``d* = (1 - λ) d_J + λ d``.
    """

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    def __post_init__(self):
        if self.k1 < 1 or self.k2 < 1:
            raise ValueError(f"ReRanking: k1 and k2 must be >= 1, got k1={self.k1}, k2={self.k2}")
        if not 0.0 <= self.lambda_value <= 1.0:
            raise ValueError(
                f"ReRanking: lambda_value must be in [0, 1], got {self.lambda_value}")

    def as_dict(self) -> dict:
        return {"k1": self.k1, "k2": self.k2, "lambda_value": self.lambda_value}


def _check_pair(query: Features, gallery: Features) -> None:
    query.check("query")
    gallery.check("gallery")
    if len(query) == 0 or len(gallery) == 0:
        raise FeatureMismatchError(
            f"need at least one query and one gallery feature, got {len(query)} query and "
            f"{len(gallery)} gallery rows")
    dq, dg = query.features.shape[1], gallery.features.shape[1]
    if dq != dg:
        raise FeatureMismatchError(
            f"query features are {list(query.features.shape)} but gallery features are "
            f"{list(gallery.features.shape)}: their dimensions ({dq} vs {dg}) must match")


def distance_matrix(query: Features, gallery: Features, metric: str = "euclidean",
                    rerank: ReRanking | None = None) -> torch.Tensor:
    """The ``[Q, G]`` distances the protocols rank on.

    Without ``rerank``: :func:`edaan_fast.ops.pairwise_distance` (``"euclidean"`` = squared
    euclidean, ``"cosine"`` = ``1 - cos``). With it: k-reciprocal re-ranking
    (:func:`~edaan_fast.metrics.reranking.re_ranking_features`) of the euclidean (or cosine)
    distances, computed in row blocks so that no ``(Q + G)^2`` matrix is held.
    """
    from edaan_fast.ops import pairwise_distance

    _check_pair(query, gallery)
    if rerank is None:
        return pairwise_distance(query.features, gallery.features, metric=metric)
    from edaan_fast.metrics.reranking import re_ranking_features

    return re_ranking_features(query.features, gallery.features, k1=rerank.k1, k2=rerank.k2,
                               lambda_value=rerank.lambda_value, metric=metric)


def reranked_rows(query: Features, gallery: Features, metric: str, rerank: ReRanking):
    """The re-ranked distances of :func:`distance_matrix` as a single-use
    :class:`~edaan_fast.ops.evaluation.RowBlocks`: the protocols rank each block of query rows
    as it is made (:func:`~edaan_fast.metrics.reranking.re_ranking_features_rows`), so the
    evaluation holds one ``[Q, G]`` buffer (``M[q, Q:]``, re-ranked in place) and no copy."""
    from edaan_fast.metrics.reranking import re_ranking_features_rows

    _check_pair(query, gallery)
    return re_ranking_features_rows(query.features, gallery.features, k1=rerank.k1,
                                    k2=rerank.k2, lambda_value=rerank.lambda_value,
                                    metric=metric)


def evaluate_features(query: Features, gallery: Features, protocol: str = "market", *,
                      metric: str = "euclidean", rerank: ReRanking | None = None,
                      repeats: int = 10, seed: int = 0, max_rank: int = 50,
                      distmat: torch.Tensor | None = None) -> ProtocolResult:
    """Scores query against gallery features under ``protocol`` (``"market"`` or ``"cuhk03"``).

    Args:
        query, gallery: the two splits' :class:`Features` (feature dimensions must agree).
        protocol: ``"market"`` (single query) or ``"cuhk03"`` (single-gallery-shot, CMC averaged
            over ``repeats`` draws seeded by ``seed``; AP/mINP on the whole gallery). PRID2011
            has two query/gallery pairs: use :func:`evaluate_prid2011`.
        metric: ``"euclidean"`` or ``"cosine"``.
        rerank: k-reciprocal re-ranking applied to the distances before ranking, or ``None``.
        max_rank: CMC length.
        distmat: the ``[Q, G]`` matrix :func:`distance_matrix` already returned for these
            arguments (re-ranked or not), ranked as is instead of being computed again.

    Without re-ranking the market protocol ranks from the features tile by tile (the ``Q x G``
    matrix is never held); with it (and no ``distmat``) every protocol ranks the re-ranked
    distances one block of query rows at a time as they are made (:func:`reranked_rows`): one
    ``[Q, G]`` buffer in all, the same metrics as ranking the whole re-ranked matrix.

    Raises:
        FeatureMismatchError: feature dimensions or id lengths disagree, or a split is empty.
        ValueError: an unknown protocol.
    """
    from .protocols import cuhk03_single_gallery_shot, market_duke

    if protocol not in ("market", "cuhk03"):
        hint = " (use evaluate_prid2011 for its two directions)" if protocol == "prid2011" else ""
        raise ValueError(f"evaluate_features: protocol must be 'market' or 'cuhk03', got "
                         f"{protocol!r}{hint}")
    _check_pair(query, gallery)
    if distmat is not None and tuple(distmat.shape) != (len(query), len(gallery)):
        raise FeatureMismatchError(f"distmat must be [{len(query)}, {len(gallery)}] for these "
                                   f"features, got {list(distmat.shape)}")
    ids = (query.pids, gallery.pids, query.camids, gallery.camids)
    if distmat is not None:
        x = distmat
    elif rerank is not None:
        x = reranked_rows(query, gallery, metric, rerank)
    else:
        x = (query.features, gallery.features) if protocol == "market" else \
            distance_matrix(query, gallery, metric)
    if protocol == "market":
        return market_duke(x, *ids, metric=metric, max_rank=max_rank)
    return cuhk03_single_gallery_shot(x, *ids, repeats=repeats, seed=seed, max_rank=max_rank)


def evaluate_prid2011(a2b: tuple[Features, Features], b2a: tuple[Features, Features], *,
                      metric: str = "euclidean", rerank: ReRanking | None = None,
                      max_rank: int = 50) -> dict[str, ProtocolResult]:
    """PRID2011 single shot in both directions (Table III): ``{"a2b", "b2a", "mean"}``.

    ``a2b`` = (cam_a query features, cam_b gallery features), ``b2a`` the reverse, as
    :func:`edaan_fast.data.prid2011` builds them with ``direction="a2b"`` / ``"b2a"``. Every
    same-pid gallery item is a positive (the cameras differ by construction).
    """
    from .protocols import prid2011

    xs = []
    for q, g in (a2b, b2a):
        _check_pair(q, g)
        xs.append((q.features, g.features) if rerank is None
                  else reranked_rows(q, g, metric, rerank))
    return prid2011(xs[0], a2b[0].pids, a2b[1].pids, xs[1], b2a[0].pids, b2a[1].pids,
                    metric=metric, max_rank=max_rank)


def evaluate_tasks(protocol: str, features: dict[str, tuple[Features, Features]], *,
                   metric: str = "euclidean", rerank: ReRanking | None = None,
                   repeats: int = 10, seed: int = 0, max_rank: int = 50,
                   distmat: torch.Tensor | None = None) -> dict[str, ProtocolResult]:
    """``{task: ProtocolResult}`` of a plan's feature pairs (plus ``"mean"`` for PRID2011,
    whose tasks are ``a2b`` and ``b2a``; otherwise the one task ``target``). ``distmat``: the
    first pair's distances when already computed (see :func:`evaluate_features`)."""
    if protocol == "prid2011":
        return evaluate_prid2011(features["a2b"], features["b2a"], metric=metric,
                                 rerank=rerank, max_rank=max_rank)
    q, g = features["target"]
    return {"target": evaluate_features(q, g, protocol, metric=metric, rerank=rerank,
                                        repeats=repeats, seed=seed, max_rank=max_rank,
                                        distmat=distmat)}

# ---------------------------------------------------------------------------------- the file


def save_features(path: Path, protocol: str, dataset: str, features: dict, meta: dict) -> Path:
    """Writes ``features`` (task name -> (query, gallery) :class:`Features`) as ``.npz``.

    Layout (``format = "edaan_fast.features"``, ``version = 1``): ``query_features`` ``[Q, D]``
    float32, ``query_pids``/``query_camids`` int64 ``[Q]``, ``query_paths`` (strings), the same
    for ``gallery_*``, plus ``protocol``, ``dataset`` and ``meta`` (JSON text). PRID2011's two
    directions are prefixed ``a2b_`` / ``b2a_``. The file is written atomically, at ``path``
    exactly (no suffix is added).
    """
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FEATURES_FORMAT), "version": np.array(FEATURES_VERSION),
        "protocol": np.array(protocol), "dataset": np.array(dataset),
        "meta": np.array(json.dumps(meta, default=str)),
    }
    for task, pair in features.items():
        prefix = "" if task == "target" else f"{task}_"
        for split, f in zip(("query", "gallery"), pair):
            arrays[f"{prefix}{split}_features"] = f.features.float().numpy()
            arrays[f"{prefix}{split}_pids"] = f.pids.numpy().astype(np.int64)
            arrays[f"{prefix}{split}_camids"] = f.camids.numpy().astype(np.int64)
            if f.paths is not None:
                arrays[f"{prefix}{split}_paths"] = np.array(f.paths, dtype=str)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise EvaluationError(f"cannot write features file {path}: {exc.strerror or exc}") \
            from None
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())  # the data on disk before the name: safe across a power cut
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise EvaluationError(f"cannot write features file {path}: "
                                  f"{exc.strerror or exc}") from None
        raise
    return path


def load_features(path: Path, protocol: str | None = None) -> tuple[str, str, dict, dict]:
    """Reads a features file: ``(protocol, dataset, {task: (query, gallery)}, meta)``.

    Files from other tools need only ``query_features``, ``query_pids``, ``query_camids`` and
    the ``gallery_*`` three (protocol ``market`` unless ``protocol`` says otherwise).
    """
    path = Path(path)
    if path.is_dir():
        raise EvaluationError(f"features file {path} is a folder; expected an .npz file written "
                              "by --export-features")
    if not path.is_file():
        raise EvaluationError(f"features file {path} does not exist")
    expected = ("an .npz archive (written by --export-features, or np.savez with query_features, "
                "query_pids, query_camids and the gallery_* three)")
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic == b"\x93NUMPY":
        raise EvaluationError(f"features file {path} is a single .npy array; expected {expected}")
    if not magic.startswith(b"PK"):
        raise EvaluationError(f"features file {path} cannot be read as .npz: it is not a zip "
                              f"archive (starts with {magic[:4]!r}); expected {expected}")
    try:
        data = np.load(path, allow_pickle=False)
        files = set(data.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise EvaluationError(f"features file {path} cannot be read as .npz (written by "
                              f"--export-features): {type(exc).__name__}: {exc}") from None
    try:
        with data:
            return _read_features(path, data, files, protocol)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # object arrays, damage
        raise EvaluationError(f"features file {path} cannot be read: {type(exc).__name__}: "
                              f"{exc}") from None


def _read_features(path: Path, data, files: set, protocol: str | None):
    stored = str(data["protocol"]) if "protocol" in files else None
    protocol = protocol or stored or "market"
    if protocol not in ("market", "cuhk03", "prid2011"):
        raise EvaluationError(f"features file {path} names protocol {protocol!r}; expected "
                              "market, cuhk03 or prid2011")
    dataset = str(data["dataset"]) if "dataset" in files else path.stem
    meta = json.loads(str(data["meta"])) if "meta" in files else {}
    tasks = [t for t, _ in PRID_TASKS] if protocol == "prid2011" else ["target"]
    out = {}
    for task in tasks:
        prefix = "" if task == "target" else f"{task}_"
        pair = []
        for split in ("query", "gallery"):
            keys = [f"{prefix}{split}_{k}" for k in ("features", "pids", "camids")]
            if not all(k in files for k in keys):
                raise EvaluationError(
                    f"features file {path} has no {prefix}{split} split: expected arrays "
                    f"{', '.join(keys)}; found {', '.join(sorted(files))}")
            feats, pids, camids = (data[k] for k in keys)
            if not np.issubdtype(feats.dtype, np.floating):
                raise EvaluationError(f"features file {path}: {keys[0]} must be floating "
                                      f"point, got {feats.dtype}")
            if feats.ndim != 2 or feats.shape[1] == 0:
                raise EvaluationError(f"features file {path}: {keys[0]} must be [N, D] with "
                                      f"D >= 1, got shape {list(feats.shape)}")
            for k, ids in zip(keys[1:], (pids, camids)):
                if not np.issubdtype(ids.dtype, np.integer):
                    raise EvaluationError(f"features file {path}: {k} must hold integer "
                                          f"ids, got {ids.dtype}")
                if ids.shape != feats.shape[:1]:
                    raise EvaluationError(f"features file {path}: {k} must be 1-D with one id "
                                          f"per row of {keys[0]} ([{feats.shape[0]}]), got "
                                          f"shape {list(ids.shape)}")
            paths_key = f"{prefix}{split}_paths"
            paths = [str(s) for s in data[paths_key]] if paths_key in files else None
            if feats.shape[0:1] == (0,):
                raise EvaluationError(f"features file {path} has an empty {prefix}{split} "
                                      f"split ({keys[0]} has shape {list(feats.shape)})")
            feats = feats.astype(np.float32) if feats.dtype == np.float16 else feats
            pair.append(Features(torch.from_numpy(np.ascontiguousarray(feats)),
                                 torch.from_numpy(pids.astype(np.int64)).reshape(-1),
                                 torch.from_numpy(camids.astype(np.int64)).reshape(-1),
                                 paths))
        out[task] = tuple(pair)
    return protocol, dataset, out, meta
