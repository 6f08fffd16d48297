"""Feature extraction and the target-domain evaluation used during and after training.

:func:`extract_features` runs ``encoder + embedding`` (the test-time path of §III-B) over a
split; :func:`extract_split_features` does it for several splits at once, reading an image that
several splits share (CUHK03's query = gallery, PRID2011's two directions) only once.
:func:`evaluate_features` ranks query against gallery features under one of the paper's
protocols, optionally after k-reciprocal re-ranking; :func:`evaluate_prid2011` scores both
PRID2011 directions and their mean; :func:`evaluate_model` extracts and ranks a data set's
query/gallery split in one call (Market-1501/Duke protocol: single query, same-camera matches
of the query's identity ignored).

Protocol names (:data:`PROTOCOLS`):

* ``"market"`` -- Market-1501 / DukeMTMC-reID single query (also the synthetic set and
  CUHK03's 767/700 split), :func:`~edaan_fast.engine.protocols.market_duke`;
* ``"cuhk03"`` -- CUHK03 1,367/100 single-gallery-shot CMC averaged over ``repeats`` draws,
  :func:`~edaan_fast.engine.protocols.cuhk03_single_gallery_shot`;
* ``"prid2011"`` -- PRID2011 cam_a -> cam_b and cam_b -> cam_a, :func:`evaluate_prid2011`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .protocols import ProtocolResult, cuhk03_single_gallery_shot, market_duke, prid2011

__all__ = [
    "PROTOCOLS",
    "FeatureMismatchError",
    "Features",
    "ReRanking",
    "attention_probe",
    "distance_matrix",
    "evaluate_attention",
    "evaluate_features",
    "evaluate_model",
    "evaluate_prid2011",
    "extract_features",
    "extract_split_features",
]

if TYPE_CHECKING:  # the data package (torchvision) loads only when images are read
    from edaan_fast.data import Record, ReIDDataset

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


@torch.no_grad()
def extract_features(model: nn.Module, records: Sequence[Record], *,
                     image_size: tuple[int, int], batch_size: int = 64, loader: str = "torch",
                     num_workers: int = 2, device: str | torch.device = "cpu",
                     amp: bool = False, flip: bool = False, progress: bool = False,
                     desc: str = "features") -> Features:
    """Test-time features of ``records`` in their order.

    Args:
        model: an :class:`~edaan_fast.models.EDAAN` (``extract_features`` is called).
        records: the split (``dataset.query``, ``dataset.gallery``).
        image_size: ``(H, W)`` the model was trained at.
        loader: ``"torch"`` or ``"dali"``.
        amp: run under autocast (bfloat16 on CPU, float16 on CUDA); features come back float32.
        flip: average the features of each image and its horizontal mirror.
        progress: show a progress bar (labelled ``desc``).
    """
    from edaan_fast.data import build_loader

    device = torch.device(device)
    was_training = model.training
    model.eval()
    dl = build_loader(records, loader=loader, train=False, batch_size=batch_size,
                      num_workers=num_workers, image_size=image_size,
                      device=None if loader == "torch" else ("gpu" if device.type == "cuda"
                                                             else "cpu"))
    feats, pids, camids, order = [], [], [], []
    batches = dl
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(dl, desc=desc, unit="batch", leave=False)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    for batch in batches:
        x = batch.images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            f = model.extract_features(x).float()
            if flip:
                f = (f + model.extract_features(x.flip(-1)).float()) / 2
        feats.append(f.cpu())
        pids.append(batch.pids.cpu())
        camids.append(batch.camids.cpu())
        order.append(batch.index.cpu())
    model.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader produced no batches")
    index = torch.cat(order)
    perm = torch.argsort(index)
    return Features(torch.cat(feats)[perm], torch.cat(pids)[perm], torch.cat(camids)[perm],
                    [r.path for r in records])


def extract_split_features(model: nn.Module, splits: Mapping[str, Sequence[Record]], *,
                           image_size: tuple[int, int], **kwargs) -> dict[str, Features]:
    """:func:`extract_features` for several splits, each distinct image path read once.

    ``splits`` maps names to record lists (e.g. ``{"query": ..., "gallery": ...}``); the result
    maps the same names to their :class:`Features`, with each split's own pids and camids.
    ``kwargs`` go to :func:`extract_features`.
    """
    union: dict[str, int] = {}
    unique: list[Record] = []
    for records in splits.values():
        for r in records:
            if r.path not in union:
                union[r.path] = len(unique)
                unique.append(r)
    if not unique:
        raise ValueError(f"extract_split_features: every split is empty ({list(splits)})")
    everything = extract_features(model, unique, image_size=image_size, **kwargs)
    out = {}
    for name, records in splits.items():
        idx = torch.tensor([union[r.path] for r in records], dtype=torch.int64)
        out[name] = Features(
            everything.features[idx],
            torch.tensor([r.pid for r in records], dtype=torch.int64),
            torch.tensor([r.camid for r in records], dtype=torch.int64),
            [r.path for r in records],
        )
    return out


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
    (:func:`~edaan_fast.engine.reranking.re_ranking_features`) of the euclidean (or cosine)
    distances, computed in row blocks so that no ``(Q + G)^2`` matrix is held.
    """
    from edaan_fast.ops import pairwise_distance

    _check_pair(query, gallery)
    if rerank is None:
        return pairwise_distance(query.features, gallery.features, metric=metric)
    from .reranking import re_ranking_features

    return re_ranking_features(query.features, gallery.features, k1=rerank.k1, k2=rerank.k2,
                               lambda_value=rerank.lambda_value, metric=metric)


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
    matrix is never held); otherwise the (re-ranked) matrix is ranked.

    Raises:
        FeatureMismatchError: feature dimensions or id lengths disagree, or a split is empty.
        ValueError: an unknown protocol.
    """
    if protocol not in ("market", "cuhk03"):
        hint = " (use evaluate_prid2011 for its two directions)" if protocol == "prid2011" else ""
        raise ValueError(f"evaluate_features: protocol must be 'market' or 'cuhk03', got "
                         f"{protocol!r}{hint}")
    _check_pair(query, gallery)
    if distmat is not None and tuple(distmat.shape) != (len(query), len(gallery)):
        raise FeatureMismatchError(f"distmat must be [{len(query)}, {len(gallery)}] for these "
                                   f"features, got {list(distmat.shape)}")
    ids = (query.pids, gallery.pids, query.camids, gallery.camids)
    if protocol == "market":
        if distmat is not None:
            x = distmat
        else:
            x = ((query.features, gallery.features) if rerank is None
                 else distance_matrix(query, gallery, metric, rerank))
        return market_duke(x, *ids, metric=metric, max_rank=max_rank)
    d = distmat if distmat is not None else distance_matrix(query, gallery, metric, rerank)
    return cuhk03_single_gallery_shot(d, *ids, repeats=repeats, seed=seed, max_rank=max_rank)


def evaluate_prid2011(a2b: tuple[Features, Features], b2a: tuple[Features, Features], *,
                      metric: str = "euclidean", rerank: ReRanking | None = None,
                      max_rank: int = 50) -> dict[str, ProtocolResult]:
    """PRID2011 single shot in both directions (Table III): ``{"a2b", "b2a", "mean"}``.

    ``a2b`` = (cam_a query features, cam_b gallery features), ``b2a`` the reverse, as
    :func:`edaan_fast.data.prid2011` builds them with ``direction="a2b"`` / ``"b2a"``. Every
    same-pid gallery item is a positive (the cameras differ by construction).
    """
    xs = []
    for q, g in (a2b, b2a):
        _check_pair(q, g)
        xs.append((q.features, g.features) if rerank is None
                  else distance_matrix(q, g, metric, rerank))
    return prid2011(xs[0], a2b[0].pids, a2b[1].pids, xs[1], b2a[0].pids, b2a[1].pids,
                    metric=metric, max_rank=max_rank)


def evaluate_model(model: nn.Module, dataset: ReIDDataset, *, image_size: tuple[int, int],
                   metric: str = "euclidean", rerank: ReRanking | None = None,
                   **kwargs) -> ProtocolResult:
    """Rank-k, mAP and mINP of ``model`` on ``dataset``'s query/gallery split (market protocol).

    ``kwargs`` go to :func:`extract_features` (batch size, loader, device, AMP, flip);
    ``rerank`` applies k-reciprocal re-ranking before ranking.
    """
    if not dataset.query or not dataset.gallery:
        raise ValueError(f"evaluate_model: data set {dataset.name!r} has no query/gallery split "
                         f"({len(dataset.query)} query, {len(dataset.gallery)} gallery images)")
    feats = extract_split_features(model, {"query": dataset.query, "gallery": dataset.gallery},
                                   image_size=image_size, **kwargs)
    return evaluate_features(feats["query"], feats["gallery"], "market", metric=metric,
                             rerank=rerank)


def attention_probe(records: Sequence[Record], max_images: int = 200) -> list[Record]:
    """Up to ``max_images`` records spread evenly over ``records`` (a fixed, seed-free choice)."""
    if len(records) <= max_images:
        return list(records)
    step = len(records) / max_images
    return [records[int(i * step)] for i in range(max_images)]


@torch.no_grad()
def evaluate_attention(model: nn.Module, splits: Mapping[str, Sequence[Record]], *,
                       image_size: tuple[int, int], device: str | torch.device = "cpu",
                       batch_size: int = 64, max_images: int = 200):
    """Attention quality of ``A_S`` and ``A_T`` on held-out images (paper eq. 1-2, Fig. 7).

    Args:
        model: an :class:`~edaan_fast.models.EDAAN` with attention nets.
        splits: ``{"A_S": source records, "A_T": target records}`` -- each net is scored on its
            own domain's images (held-out: pass the test splits, ``query + gallery``).
        image_size: ``(H, W)`` the model was trained at.
        max_images: images per net, spread evenly over the records.

    Returns:
        ``{"A_S": AttentionQuality, "A_T": AttentionQuality}``: against the ground-truth person
        masks where every image has one (the synthetic set), label-free proxies otherwise
        (:mod:`edaan_fast.metrics.attention`).
    """
    import torch.nn.functional as F

    from edaan_fast.data import build_loader
    from edaan_fast.data.synthetic import load_mask, mask_path
    from edaan_fast.metrics import attention_quality

    device = torch.device(device)
    nets = {"A_S": model.attention_S, "A_T": model.attention_T}
    was_training = model.training
    model.eval()
    out = {}
    for name, records in splits.items():
        probe = attention_probe(records, max_images)
        dl = build_loader(probe, train=False, batch_size=batch_size, num_workers=0,
                          image_size=image_size)
        maps = torch.cat([nets[name](b.images.to(device)).float().cpu() for b in dl])
        masks = None
        if all(mask_path(r.path).is_file() for r in probe):
            masks = torch.stack([torch.from_numpy(load_mask(r.path)) for r in probe])[:, None]
            if masks.shape[-2:] != maps.shape[-2:]:
                masks = F.interpolate(masks, size=maps.shape[-2:], mode="bilinear",
                                      align_corners=False)
        out[name] = attention_quality(maps, masks)
    model.train(was_training)
    return out
