"""edaan_fast.data: re-ID data set readers, the embedded synthetic two-domain set,
identity (PK) and label-free samplers, and the torch / DALI loaders.

>>> from edaan_fast.data import build_dataset, build_loader, PKSampler
>>> src = build_dataset("synthetic", domain="source", preset="tiny")
>>> sampler = PKSampler([r.pid for r in src.train], P=4, K=4, seed=0)
>>> loader = build_loader(src.train, sampler=sampler, image_size=(64, 32))
"""

from .base import DatasetError, Record, ReIDDataset, read_image
from .datasets import DATASETS, build_dataset, dukemtmcreid, market1501
from .loaders import Batch, build_loader, dali_available
from .samplers import PKSampler, RandomBatchSampler, SequentialBatchSampler
from .synthetic import PRESETS, SyntheticPreset, load_mask, render

__all__ = [
    "DATASETS", "PRESETS", "Batch", "DatasetError", "PKSampler", "RandomBatchSampler",
    "ReIDDataset", "Record", "SequentialBatchSampler", "SyntheticPreset", "build_dataset",
    "build_loader", "dali_available", "dukemtmcreid", "load_mask", "market1501", "read_image",
    "render",
]
