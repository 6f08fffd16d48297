"""Benchmark helpers: quick mode, CUDA-synchronised timing, and ratio tables in the summary.

Every case calls ``measure(benchmark, group, name, fn, bytes_moved=None)``; at the end of the
run a table per group lists each case's median, its ratio to the group's baseline (the eager
reference unless the case says otherwise), its bandwidth when ``bytes_moved`` is given and, in
groups with a ``copy`` case, that bandwidth as a fraction of the copy's.

CPU allocator: glibc returns freed blocks of tens of MB to the OS and maps them again on the
next allocation, so a loop that allocates large outputs pays a page fault per 4 KiB page on
every call (on this 2-core VM that costs more than the arithmetic: a 25 MB output takes ~5 ms
to fault in). Long-running processes with a caching allocator (jemalloc, tcmalloc, or glibc with
``MALLOC_TRIM_THRESHOLD_``/``MALLOC_MMAP_THRESHOLD_`` raised) do not pay it. The benchmarks
therefore pin glibc's thresholds at start-up (``mallopt``, equal for every implementation
measured; ``edaan_fast._allocator``) so that they compare kernels, not page faults;
``EDAAN_FAST_GLIBC_DEFAULTS=1`` keeps glibc's defaults instead.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch

from benchmarks._timing import median_seconds
from edaan_fast._allocator import pin_malloc_thresholds

QUICK = os.environ.get("EDAAN_FAST_BENCH_QUICK", "0") == "1"
_RESULTS: dict[str, dict[str, dict]] = defaultdict(dict)
ALLOCATOR = pin_malloc_thresholds()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture
def measure():
    def run(benchmark, group: str, name: str, fn, *, device="cpu", bytes_moved=None,
            baseline=False, rounds=None):
        benchmark.group = group
        benchmark.name = name

        def timed():
            out = fn()
            _sync(device)
            return out

        timed()  # warm-up (allocator, lazy init, compilation)
        if rounds is not None and not QUICK:
            result = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
        else:
            result = benchmark(timed)
        median = median_seconds(benchmark)
        if median is not None:
            entry = {"median": median, "baseline": baseline}
            if bytes_moved:
                entry["gbps"] = bytes_moved / median / 1e9
                benchmark.extra_info["GB/s"] = round(entry["gbps"], 2)
            _RESULTS[group][name] = entry
        return result

    return run


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("edaan_fast benchmark ratios (median; ratio = baseline median / case median)")
    tr.write_line(f"CPU allocator: {ALLOCATOR}")
    for group, cases in _RESULTS.items():
        base = next((c for c in cases.values() if c["baseline"]), None)
        tr.write_line(f"[{group}]")
        for name, c in cases.items():
            ratio = f"{base['median'] / c['median']:6.2f}x" if base else "   n/a"
            bw = f"  {c['gbps']:7.2f} GB/s" if "gbps" in c else ""
            copy = cases.get("copy")
            if bw and copy and "gbps" in copy and name != "copy":
                bw += f"  {100 * c['gbps'] / copy['gbps']:5.1f}% of copy"
            tr.write_line(f"  {name:<28} {c['median'] * 1e3:9.3f} ms  {ratio}{bw}")
