"""Train several variants with the same seed and budget and compare them on the target.

A plain script (not collected by pytest): each variant runs as its own
``python -m edaan_fast.train`` process, one after another, so that every run starts from the
same state and the wall times are comparable. Prints a Markdown table shaped like the paper's
Tables I and V and writes it to ``<output-dir>/variants.md``::

    python benchmarks/compare_variants.py --output-dir runs/variants
    python benchmarks/compare_variants.py --variants edaan,edaan-noattn,daan,cyclegan,direct \\
        --epochs 40 --seed 0 --output-dir runs/variants

Variant names: ``edaan``, ``daan``, ``cyclegan``, ``direct``, with the suffixes
``-noattn`` (``--no-attention``) and ``-triplet`` (``--metric-loss triplet``), e.g.
``edaan-noattn-triplet``. Arguments after ``--`` go to every run (e.g. ``-- --preset paper``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from edaan_fast.engine.report import markdown_table
from edaan_fast.engine.run_config import VARIANTS

SUFFIXES = {"noattn": ["--no-attention"], "triplet": ["--metric-loss", "triplet"]}


def variant_args(name: str) -> list[str]:
    """``edaan-noattn`` -> ``["--variant", "edaan", "--no-attention"]``."""
    base, *suffixes = name.split("-")
    if base not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: the base must be one of "
                         f"{', '.join(VARIANTS)}")
    args = ["--variant", base]
    for s in suffixes:
        if s not in SUFFIXES:
            raise ValueError(f"unknown suffix -{s} in {name!r}; choices: "
                             f"{', '.join('-' + k for k in SUFFIXES)}")
        args += SUFFIXES[s]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/variants",
                   help="one sub-folder per variant, plus variants.md (default: runs/variants)")
    p.add_argument("--variants", default="edaan,edaan-noattn,direct",
                   help="comma-separated variant names (default: edaan,edaan-noattn,direct)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of every run (default: the preset's, 40 for tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default: 0)")
    p.add_argument("--no-amp", dest="amp", action="store_false",
                   help="train without --amp (default: with, as the acceptance command)")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in names:
        variant_args(name)  # fail before training anything
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for name in names:
        cmd = [sys.executable, "-m", "edaan_fast.train", *variant_args(name),
               "--seed", str(args.seed), "--output-dir", str(out / name), "--no-progress",
               *(["--amp"] if args.amp else []),
               *(["--epochs", str(args.epochs)] if args.epochs is not None else []), *extra]
        print(f"$ {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        status = subprocess.run(cmd, check=False).returncode
        if status != 0:
            print(f"{name}: exit status {status}; stopping", file=sys.stderr)
            return status
        report = json.loads((out / name / "report.json").read_text())
        print(f"{name}: {time.perf_counter() - start:.0f} s wall", flush=True)
        reports.append(report)
    table = markdown_table(reports, extra_columns=("mINP", "seconds"))
    command = " ".join(["python", "benchmarks/compare_variants.py", *sys.argv[1:]])
    (out / "variants.md").write_text(f"`{command}`\n\n{table}")
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
