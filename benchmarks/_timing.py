"""Small helpers shared by the benchmark files."""

from __future__ import annotations


def median_seconds(benchmark) -> float | None:
    """The median round time of a finished ``benchmark`` case, or None when it was not timed.

    Under ``--benchmark-disable`` (the quick CI run) pytest-benchmark runs each case once and
    keeps no statistics; ratios and throughputs are then simply not recorded.
    """
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None) if stats is not None else None
    return None if inner is None else inner.median
