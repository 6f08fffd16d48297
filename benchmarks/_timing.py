"""Small helpers shared by the benchmark files: medians of a finished pytest-benchmark case, and
the benchmarks' own interleaved timing with the speed floors it checks.

Speed floors. Every benchmark file pairs the fused code with a baseline and checks a coarse
floor on their ratio, about half of what ``benchmarks/RESULTS.md`` reports (or, where quick
mode's small problems give other ratios, about half of what quick mode measured on the 2-core
CI machine). The floors are checked in every mode, also under ``--benchmark-disable`` (CI's quick
run), where pytest-benchmark times nothing: the ratio comes from :func:`interleaved`, the median
of a few rounds in which the implementations run one after the other, so that load from other
jobs slows them alike, on fixed problems (the same in quick and full mode), on one CPU thread: on
a shared 2-core machine, two threads' parallel regions wait for the busy core and the ratio
measures the scheduler (see the re-ranking section of RESULTS.md). A ratio below its floor is
measured again (three tries in all), so a burst of load on the machine does not fail the run but
a real slowdown does. The stated targets, above the floors, stay reported, not enforced.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import pytest
import torch


def median_seconds(benchmark) -> float | None:
    """The median round time of a finished ``benchmark`` case, or None when it was not timed.

    Under ``--benchmark-disable`` (the quick CI run) pytest-benchmark runs each case once and
    keeps no statistics; ratios and throughputs are then simply not recorded.
    """
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None) if stats is not None else None
    return None if inner is None else inner.median


def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(cases: dict[str, Callable[[], object]], rounds: int, *, device=None,
                warmup: int = 1) -> dict[str, float]:
    """Median seconds of each case over ``rounds`` rounds; in every round the cases run one
    after another (after ``warmup`` untimed rounds: allocator, lazy initialisation, threads)."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
            _sync(device)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Runs the block with one intra-op CPU thread (the floors' timing, see above)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def speedup(cases: dict[str, Callable[[], object]], rounds: int,
            base: str = "base") -> Callable[[], float]:
    """A measurement for :func:`check_floor`: ``median(cases[base]) / median(cases["fused"])``
    of ``rounds`` interleaved rounds on one thread."""
    def measure() -> float:
        with one_thread():
            med = interleaved(cases, rounds)
        return med[base] / med["fused"]
    return measure


def check_floor(what: str, measure: Callable[[], float], floor: float, benchmark=None,
                tries: int = 3) -> float:
    """Fails unless ``measure()``, a speed-up (baseline time / fused time, higher is better),
    reaches ``floor`` in one of ``tries`` measurements; records the best in the benchmark's
    ``extra_info`` and returns it."""
    ratios = []
    for _ in range(tries):
        ratios.append(measure())
        if ratios[-1] >= floor:
            break
    best = max(ratios)
    if benchmark is not None:
        benchmark.extra_info[f"{what} (floor {floor}x)"] = round(best, 3)
    print(f"\n{what}: {', '.join(f'{r:.2f}x' for r in ratios)} (floor {floor}x)")
    if not best >= floor:
        pytest.fail(f"{what}: {', '.join(f'{r:.2f}x' for r in ratios)} in {len(ratios)} "
                    f"measurements, below the floor of {floor}x", pytrace=False)
    return best
