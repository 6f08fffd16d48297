"""Feature extraction and attention probes: the part of evaluation that runs the model.

:func:`extract_features` runs ``encoder + embedding`` (the test-time path of §III-B) over a
split; :func:`extract_split_features` does it for several splits at once, reading an image that
several splits share (CUHK03's query = gallery, PRID2011's two directions) only once;
:func:`evaluate_model` extracts and ranks a data set's query/gallery split in one call
(Market-1501/Duke protocol); :func:`evaluate_attention` scores the attention maps on held-out
images against the true person (:mod:`edaan_fast.metrics.attention`).

Ranking the features (:class:`Features`, :func:`evaluate_features`, :func:`evaluate_prid2011`,
:data:`PROTOCOLS`) lives in :mod:`edaan_fast.metrics.features`; it is re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from edaan_fast._progress import progress_bar
from edaan_fast.engine.precision import resolve_precision
from edaan_fast.metrics.features import (
    Features,
    ReRanking,
    evaluate_features,
)
from edaan_fast.metrics.protocols import ProtocolResult

__all__ = [
    "attention_probe",
    "evaluate_attention",
    "evaluate_model",
    "extract_features",
    "extract_split_features",
    "model_features",
]

if TYPE_CHECKING:  # the data package (torchvision) loads only when images are read
    from edaan_fast.data import Record, ReIDDataset

@torch.no_grad()
def model_features(model: nn.Module, x: torch.Tensor, *, amp: bool = False,
                   flip: bool = False) -> torch.Tensor:
    """Test-time features ``[N, embedding_dim]`` (float32) of a preprocessed batch ``x`` on the
    model's device: ``embedding(pool(E_S(x)))``, under autocast with ``amp`` (the dtype of
    :func:`~edaan_fast.engine.precision.resolve_precision`), averaged with the features of the
    mirrored images with ``flip``. The one feature computation of evaluation and
    :class:`~edaan_fast.deploy.extractor.FeatureExtractor`.
    """
    amp_dtype = resolve_precision(amp, "auto", x.device, cpu_fallback=True)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        f = model.extract_features(x).float()
        if flip:
            f = (f + model.extract_features(x.flip(-1)).float()) / 2
    return f


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
        amp: run under autocast in the dtype of
            :func:`~edaan_fast.engine.precision.resolve_precision` (bfloat16 on CPUs and on GPUs
            of compute capability 8.0+, float16 on older GPUs); features come back float32.
        flip: average the features of each image and its horizontal mirror.
        progress: show a progress bar (labelled ``desc``).
    """
    from edaan_fast.data import build_loader

    device = torch.device(device)
    was_training = model.training
    model.eval()
    dl = build_loader(records, loader=loader, train=False, batch_size=batch_size,
                      num_workers=num_workers, image_size=image_size,
                      device=None if loader == "torch" else device)
    feats, pids, camids, order = [], [], [], []
    batches = progress_bar(dl, enabled=progress, desc=desc, unit="batch", leave=False)
    for batch in batches:
        x = batch.images.to(device, non_blocking=True)
        feats.append(model_features(model, x, amp=amp, flip=flip).cpu())
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
                       batch_size: int = 64, max_images: int = 200,
                       person_masks: Mapping[str, str | Path | None] | None = None):
    """Attention quality of ``A_S`` and ``A_T`` on held-out images (paper eq. 1-2, Fig. 7).

    Args:
        model: an :class:`~edaan_fast.models.EDAAN` with attention nets.
        splits: ``{"A_S": source records, "A_T": target records}`` -- each net is scored on its
            own domain's images (held-out: pass the test splits, ``query + gallery``).
        image_size: ``(H, W)`` the model was trained at.
        max_images: images per net, spread evenly over the records.
        person_masks: ``{"A_S": mask folder, "A_T": mask folder}`` of a real data set
            (:mod:`edaan_fast.data.person_masks`); a net without one is scored against the
            synthetic set's own masks where its images have them.

    Returns:
        ``{"A_S": AttentionQuality, "A_T": AttentionQuality}``: against person masks where
        there are some (the synthetic set's, or a mask folder's; crops in which the segmenter
        found no person are left out), label-free proxies otherwise
        (:mod:`edaan_fast.metrics.attention`).

    Raises:
        DatasetError: a mask folder that does not fit the images (the first bad file named).
    """
    import torch.nn.functional as F

    from edaan_fast.data import build_loader
    from edaan_fast.data.person_masks import read_person_masks
    from edaan_fast.data.synthetic import load_masks
    from edaan_fast.metrics import attention_quality

    device = torch.device(device)
    nets = {"A_S": model.attention_S, "A_T": model.attention_T}
    was_training = model.training
    model.eval()
    out = {}
    for name, records in splits.items():
        probe = attention_probe(records, max_images)
        folder = (person_masks or {}).get(name)
        masks = None
        if folder is not None:
            probe, masks = read_person_masks(probe, folder, size=tuple(image_size))
        if not probe:
            continue
        dl = build_loader(probe, train=False, batch_size=batch_size, num_workers=0,
                          image_size=image_size)
        maps = torch.cat([nets[name](b.images.to(device)).float().cpu() for b in dl])
        if folder is None:
            masks = load_masks(probe)
        if masks is not None and masks.shape[-2:] != maps.shape[-2:]:
            masks = F.interpolate(masks, size=maps.shape[-2:], mode="bilinear",
                                  align_corners=False)
        out[name] = attention_quality(maps, masks)
    model.train(was_training)
    return out
