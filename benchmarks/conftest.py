"""Benchmark helpers: quick mode, CUDA-synchronised timing, and ratio tables in the summary.

Every case calls ``measure(benchmark, group, name, fn, bytes_moved=None)``; at the end of the
run a table per group lists each case's median, its ratio to the group's baseline (the eager
reference unless the case says otherwise) and its bandwidth when ``bytes_moved`` is given.
"""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch

from benchmarks._timing import median_seconds

QUICK = os.environ.get("EDAAN_FAST_BENCH_QUICK", "0") == "1"
_RESULTS: dict[str, dict[str, dict]] = defaultdict(dict)


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
    for group, cases in _RESULTS.items():
        base = next((c for c in cases.values() if c["baseline"]), None)
        tr.write_line(f"[{group}]")
        for name, c in cases.items():
            ratio = f"{base['median'] / c['median']:6.2f}x" if base else "   n/a"
            bw = f"  {c['gbps']:7.2f} GB/s" if "gbps" in c else ""
            tr.write_line(f"  {name:<28} {c['median'] * 1e3:9.3f} ms  {ratio}{bw}")
