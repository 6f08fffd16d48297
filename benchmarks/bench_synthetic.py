"""Rendering the embedded synthetic two-domain set: the ``tiny`` preset (what the default
``python -m edaan_fast.train`` renders on first use) from scratch, in one process.

    python -m pytest benchmarks/bench_synthetic.py -o python_files='bench_*.py'

The promise: the ``tiny`` preset renders in a few seconds. It is checked on the CPU time of the
render (one process, ``workers=1``, the default for ``tiny``), which other jobs on a shared
machine disturb far less than wall-clock time: at most ``CEILING_CPU_S``, about twice the
1.6-2.2 s of CPU measured on the 2-core machine (3.3-4.4 s wall-clock there, under a load
average of 8). Wall-clock time is reported beside it.
"""

from __future__ import annotations

import json
import statistics
import time

from benchmarks.conftest import QUICK
from edaan_fast.data import render

ROUNDS = 1 if QUICK else 3
CEILING_CPU_S = 4.5


def test_render_tiny(benchmark, tmp_path):
    cpu, wall = [], []
    folders = []

    def once():
        root = tmp_path / f"r{len(folders)}"
        c0, w0 = time.process_time(), time.perf_counter()
        folders.append(render(root, "tiny", seed=0, workers=1))
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)

    benchmark.group = "synthetic render (tiny preset, 1 process)"
    benchmark.pedantic(once, rounds=ROUNDS, iterations=1)
    cpu_s, wall_s = statistics.median(cpu), statistics.median(wall)
    benchmark.extra_info.update(cpu_s=round(cpu_s, 2), wall_s=round(wall_s, 2))
    print(f"\ntiny render: {cpu_s:.2f} s CPU, {wall_s:.2f} s wall (median of {len(cpu)})")
    marker = json.loads((folders[-1] / ".complete.json").read_text())
    assert marker["preset"]["name"] == "tiny" and marker["counts"]["source"] > 200
    assert cpu_s < CEILING_CPU_S, f"tiny preset took {cpu_s:.1f} s of CPU to render"
