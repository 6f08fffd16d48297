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
``test_dali_over_torch_interleaved`` alternates torch and DALI epochs (a torch epoch runs, timed
by hand, in the set-up of every timed DALI round), so that both see the same machine load:
its ``dali_over_torch`` is the ratio to quote on a shared or noisy machine. It also records
the CPU time per image of each loader (all threads, and the torch workers' processes), which
other jobs on the machine disturb far less than wall-clock time.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from pathlib import Path

import pytest

from benchmarks._timing import median_seconds
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


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its live child processes (Linux /proc)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


NEEDS_DALI = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None,
                                reason="DALI not installed")


def _loader(records, backend):
    loader = build_loader(records, loader=backend, train=True, batch_size=BATCH,
                          num_workers=WORKERS, image_size=IMAGE_SIZE,
                          device="cpu" if backend == "dali" else None)
    n = _epoch(loader)  # warm-up: worker start-up / pipeline build
    assert n == len(records) // BATCH * BATCH
    return loader, n


@pytest.mark.parametrize("backend", ["torch", pytest.param("dali", marks=NEEDS_DALI)])
def test_loader_throughput(benchmark, records, backend):
    loader, n = _loader(records, backend)
    benchmark.group = f"loader {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} train, {WORKERS} workers"
    benchmark.pedantic(_epoch, args=(loader,), rounds=ROUNDS, iterations=1)
    median = median_seconds(benchmark)
    if median is None:  # --benchmark-disable: one untimed round
        return
    ips = n / median
    _throughput[backend] = ips
    benchmark.extra_info.update({"images": n, "images_per_s": round(ips, 1),
                                 "batch_size": BATCH, "workers": WORKERS})
    if backend == "dali" and "torch" in _throughput:
        benchmark.extra_info["dali_over_torch"] = round(ips / _throughput["torch"], 2)


@NEEDS_DALI
def test_dali_over_torch_interleaved(benchmark, records):
    torch_loader, n = _loader(records, "torch")
    dali_loader, _ = _loader(records, "dali")
    torch_seconds, cpu = [], {"torch": [], "dali": []}

    def torch_epoch():  # set-up of each timed DALI round: not part of its time
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        _epoch(torch_loader)
        torch_seconds.append(time.perf_counter() - start)
        cpu["torch"].append(_cpu_seconds() - start_cpu)

    def dali_epoch():
        start_cpu = _cpu_seconds()
        _epoch(dali_loader)
        cpu["dali"].append(_cpu_seconds() - start_cpu)

    benchmark.group = f"loader {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} train, interleaved"
    benchmark.pedantic(dali_epoch, setup=torch_epoch, rounds=ROUNDS, iterations=1)
    median = median_seconds(benchmark)
    if median is None:  # --benchmark-disable: one untimed round
        return
    dali_ips = n / median
    torch_ips = n / statistics.median(torch_seconds)
    cpu_ms = {k: 1000 * statistics.median(v) / n for k, v in cpu.items()}
    benchmark.extra_info.update({
        "images": n, "dali_images_per_s": round(dali_ips, 1),
        "torch_images_per_s": round(torch_ips, 1),
        "dali_over_torch": round(dali_ips / torch_ips, 2),
        "torch_cpu_ms_per_image": round(cpu_ms["torch"], 3),
        "dali_cpu_ms_per_image": round(cpu_ms["dali"], 3),
        "torch_over_dali_cpu_cost": round(cpu_ms["torch"] / cpu_ms["dali"], 2)})
