"""Loader throughput: the DALI CPU pipeline vs the torch DataLoader on the same files.

Both read the same JPEGs in the same (random, full-batch) order and apply the same training
augmentations at 256 x 128 (resize, flip, pad 10 + random crop, normalise) with 2 worker
processes (torch) / 2 threads (DALI), batch 32; one round = one pass over the files. Files:
the real Market-1501 subset's training images when this machine has it
(``../shared/data/market1501-mini`` or ``$EDAAN_FAST_SHARED_DATA``), else the synthetic
``small`` preset (128 x 64 JPEGs, like Market-1501's).

    python -m pytest benchmarks/bench_loaders.py --benchmark-only -q
    EDAAN_FAST_BENCH_QUICK=1 python -m pytest benchmarks/bench_loaders.py --benchmark-only -q

``benchmark.extra_info`` holds ``images_per_s`` (from the median round) and, in the DALI case,
``dali_over_torch``, the ratio of the two when the torch case ran first in the same session.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from edaan_fast.data import build_dataset, build_loader

QUICK = os.environ.get("EDAAN_FAST_BENCH_QUICK", "") not in ("", "0")
ROUNDS = 2 if QUICK else 7
MAX_IMAGES = 256 if QUICK else None
IMAGE_SIZE = (256, 128)
BATCH = 32
WORKERS = 2
_throughput: dict[str, float] = {}


def _market_mini() -> Path | None:
    candidates = []
    if os.environ.get("EDAAN_FAST_SHARED_DATA"):
        env = Path(os.environ["EDAAN_FAST_SHARED_DATA"])
        candidates += [env / "market1501-mini", env]
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data"
                      / "market1501-mini")
    return next((c for c in candidates
                 if (c / "Market-1501-v15.09.15" / "bounding_box_train").is_dir()), None)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = _market_mini()
    if root is not None:
        recs = build_dataset("market1501", root).train
    else:
        preset = "tiny" if QUICK else "small"
        recs = build_dataset("synthetic", tmp_path_factory.mktemp("bench"), preset=preset).train
    return recs[:MAX_IMAGES] if MAX_IMAGES else recs


def _epoch(loader) -> int:
    return sum(len(batch) for batch in loader)


@pytest.mark.parametrize("backend", [
    "torch",
    pytest.param("dali", marks=pytest.mark.skipif(
        importlib.util.find_spec("nvidia.dali") is None, reason="DALI not installed")),
])
def test_loader_throughput(benchmark, records, backend):
    loader = build_loader(records, loader=backend, train=True, batch_size=BATCH,
                          num_workers=WORKERS, image_size=IMAGE_SIZE, device="cpu"
                          if backend == "dali" else None)
    n = _epoch(loader)  # warm-up: worker start-up / pipeline build
    assert n == len(records) // BATCH * BATCH
    benchmark.group = f"loader {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} train, {WORKERS} workers"
    benchmark.pedantic(_epoch, args=(loader,), rounds=ROUNDS, iterations=1)
    ips = n / benchmark.stats.stats.median
    _throughput[backend] = ips
    benchmark.extra_info.update({"images": n, "images_per_s": round(ips, 1),
                                 "batch_size": BATCH, "workers": WORKERS})
    if backend == "dali" and "torch" in _throughput:
        benchmark.extra_info["dali_over_torch"] = round(ips / _throughput["torch"], 2)
