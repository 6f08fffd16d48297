"""Feature extraction and the target-domain evaluation used during and after training.

:func:`extract_features` runs ``encoder + embedding`` (the test-time path of §III-B) over a
split; :func:`evaluate_model` extracts query and gallery features of a data set and ranks them
with the fused evaluator (Market-1501/Duke protocol: single query, same-camera matches of the
query's identity ignored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edaan_fast.data import Record, ReIDDataset, build_loader

from .protocols import ProtocolResult, market_duke

__all__ = ["Features", "evaluate_model", "extract_features"]


@dataclass
class Features:
    """Features of one split: ``features`` float32 ``[N, D]`` (CPU), ``pids``/``camids`` int64."""

    features: torch.Tensor
    pids: torch.Tensor
    camids: torch.Tensor


@torch.no_grad()
def extract_features(model: nn.Module, records: Sequence[Record], *,
                     image_size: tuple[int, int], batch_size: int = 64, loader: str = "torch",
                     num_workers: int = 2, device: str | torch.device = "cpu",
                     amp: bool = False, flip: bool = False, progress: bool = False) -> Features:
    """Test-time features of ``records`` in their order.

    Args:
        model: an :class:`~edaan_fast.models.EDAAN` (``extract_features`` is called).
        records: the split (``dataset.query``, ``dataset.gallery``).
        image_size: ``(H, W)`` the model was trained at.
        loader: ``"torch"`` or ``"dali"``.
        amp: run under autocast (bfloat16 on CPU, float16 on CUDA); features come back float32.
        flip: average the features of each image and its horizontal mirror.
        progress: show a progress bar.
    """
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
        batches = tqdm(dl, desc="features", unit="batch", leave=False)
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
    return Features(torch.cat(feats)[perm], torch.cat(pids)[perm], torch.cat(camids)[perm])


def evaluate_model(model: nn.Module, dataset: ReIDDataset, *, image_size: tuple[int, int],
                   metric: str = "euclidean", **kwargs) -> ProtocolResult:
    """Rank-k, mAP and mINP of ``model`` on ``dataset``'s query/gallery split.

    ``kwargs`` go to :func:`extract_features` (batch size, loader, device, AMP, flip).
    """
    if not dataset.query or not dataset.gallery:
        raise ValueError(f"evaluate_model: data set {dataset.name!r} has no query/gallery split "
                         f"({len(dataset.query)} query, {len(dataset.gallery)} gallery images)")
    q = extract_features(model, dataset.query, image_size=image_size, **kwargs)
    g = extract_features(model, dataset.gallery, image_size=image_size, **kwargs)
    return market_duke((q.features, g.features), q.pids, g.pids, q.camids, g.camids,
                       metric=metric)
