"""float32 against bfloat16 autocast for one EDAAN training step on this CPU, interleaved.

    python benchmarks/cpu_precision.py [--presets tiny,paper] [--rounds 20] [--batch 16]

What ``train --amp-dtype auto`` decides on a CPU rests on this measurement (see
``edaan_fast.engine.precision``). For each preset it builds two identical models and training
steps (the fused ops, a PK batch of ``--batch`` source + ``--batch`` target images, the first
phase), warms both up, then alternates one float32 step and one bfloat16 step ``--rounds``
times, so both see the same machine load, and prints the median step times and their ratio
with the CPU it ran on. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from edaan_fast.engine.precision import cpu_has_native_bf16
from edaan_fast.engine.steps import EDAANTrainStep, Phase
from edaan_fast.losses import EDAANObjective, QuartetLoss
from edaan_fast.models import build_model

K = 4  # images per identity


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _step(preset: str, batch: int, dtype: torch.dtype | None):
    torch.manual_seed(0)
    model = build_model(preset, num_ids=batch // K).train()
    step = EDAANTrainStep(model, EDAANObjective(QuartetLoss()), amp=dtype is not None,
                          amp_dtype=dtype, pool_size=50)
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(model.discriminator_parameters(), lr=2e-4, betas=(0.5, 0.999))
    h, w = model.config.image_size
    g = torch.Generator().manual_seed(0)
    x_s = torch.rand(batch, 3, h, w, generator=g) * 2 - 1
    x_t = torch.rand(batch, 3, h, w, generator=g) * 2 - 1
    labels = torch.arange(batch) // K
    return lambda: step(x_s, labels, x_t, opt_g, opt_d, Phase(True, False))


def measure(preset: str, rounds: int, batch: int) -> dict:
    """Median seconds per step of float32 and bfloat16 autocast, interleaved."""
    runs = {"float32": _step(preset, batch, None), "bfloat16": _step(preset, batch, torch.bfloat16)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up: allocator, oneDNN primitive caches
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"preset": preset, "batch": f"{batch}+{batch}", "rounds": rounds,
            "float32_s": med["float32"], "bfloat16_s": med["bfloat16"],
            "bf16_speedup": med["float32"] / med["bfloat16"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,paper")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if not cpu_has_native_bf16():
        print("this CPU has no native bfloat16 (AVX512-BF16/AMX): --amp trains in float32 here, "
              "nothing to compare", file=sys.stderr)
        return 0
    cpu = (f"{_cpu_name()}, {torch.get_num_threads()} threads, "
           f"{torch.backends.cpu.get_cpu_capability()}")
    rows = [measure(name, args.rounds, args.batch) for name in args.presets.split(",")]
    print(f"CPU: {cpu}; torch {torch.__version__}")
    print("| preset | batch | float32 s/step | bfloat16 s/step | bf16 speed-up |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['batch']} | {r['float32_s']:.3f} | {r['bfloat16_s']:.3f} | "
              f"{r['bf16_speedup']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "torch": torch.__version__, "rows": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
