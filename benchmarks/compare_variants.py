"""Train the paper's variants over several seeds and compare them on the target (Table V).

A plain script (not collected by pytest): each (variant, seed) runs as its own
``python -m edaan_fast.train`` process with the same budget, ``--jobs`` of them at a time (each
limited to ``--threads`` CPU threads; by default one single-threaded run per core: the
networks' small convolutions use a second thread poorly, so runs side by side finish a set
sooner than one run at a time on every core). A run whose ``report.json`` exists is not
trained again, so an interrupted comparison continues where it stopped. Writes ``<output-dir>/variants.md``
and ``variants.json``::

    python benchmarks/compare_variants.py --output-dir runs/variants            # Table V, 3 seeds
    python benchmarks/compare_variants.py --variants edaan,edaan-triplet --seeds 0,1,2
    python benchmarks/compare_variants.py --variants edaan,daan,edaan-triplet --amp   # fastest

The report has three parts:

1. Table V's shape: rank-1/5/10 and mAP on the target as mean ± std over the seeds, with the
   attention quality (ROC-AUC of ``A_S`` / ``A_T`` against the true person masks) where the
   variant has attention nets.
2. Target mAP seed by seed. The seed also draws the embedded data set, and some seeds are much
   easier than others for every variant, so variants are compared seed by seed.
3. The paper's orderings (EDAAN > EDAAN w/o attention > Direct Transfer, DAAN with > DAAN w/o
   attention, quartet >= triplet): the paired mAP gap on each seed, whether it holds on every
   seed, and the mean and standard deviation of the gap.

Variant names: ``edaan``, ``daan``, ``cyclegan``, ``direct``, with the suffixes ``-noattn``
(``--no-attention``), ``-triplet`` (``--metric-loss triplet``) and ``-guided``
(``--mask-guidance 10``: the attention nets also learn the person masks of the training crops,
not in the paper), e.g. ``edaan-noattn``. Arguments after ``--`` go to every run (e.g. ``--
--preset paper``). On real data sets, with the mask folders every run reads::

    python benchmarks/compare_variants.py --amp \
        --variants edaan-guided,edaan-noattn,daan-guided,cyclegan,direct -- --preset small \
        --source market1501 --source-root ../shared/data/cuhk03-mini --target market1501 \
        --target-root ../shared/data/market1501-mini \
        --source-person-masks masks/cuhk03-mini --target-person-masks masks/market1501-mini

The orderings compare a variant with its ``-guided`` form where only that one ran.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edaan_fast.engine.run_config import VARIANTS
from edaan_fast.evaluation.report import METRIC_KEYS, method_name

SUFFIXES = {"noattn": ["--no-attention"], "triplet": ["--metric-loss", "triplet"],
            "guided": ["--mask-guidance", "10"]}
TABLE_V = "edaan,edaan-noattn,daan,daan-noattn,cyclegan,direct"
#: (better, worse, how): the paper's claims, checked where both variants ran.
ORDERINGS = (("edaan", "edaan-noattn", ">"), ("edaan-noattn", "direct", ">"),
             ("edaan", "direct", ">"), ("daan", "daan-noattn", ">"),
             ("edaan", "edaan-triplet", ">="))


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


def _run(name: str, seed: int, out: Path, args, extra: list[str]) -> dict:
    folder = out / f"{name}_seed{seed}"
    report = folder / "report.json"
    if not report.is_file():
        cmd = [sys.executable, "-m", "edaan_fast.train", *variant_args(name), "--seed", str(seed),
               "--output-dir", str(folder), "--overwrite", "--no-progress",
               *(["--amp"] if args.amp else ["--no-amp"]),
               *(["--epochs", str(args.epochs)] if args.epochs is not None else []), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(folder / "train.log", "w") as log:
            status = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"{name} seed {seed}: exit {status}, {time.perf_counter() - start:.0f} s "
              f"({' '.join(cmd[1:])})", flush=True)
        if status != 0:
            raise RuntimeError(f"{name} seed {seed} failed (exit {status}); see {folder}/train.log")
    return json.loads(report.read_text())


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
    if not values or any(v is None for v in values):
        return "-"
    m, s = _mean_std([scale * v for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _ran(name: str, reports: dict) -> str | None:
    """The variant that stands for ``name`` in an ordering: itself, or its ``-guided`` form
    when only that one ran."""
    return next((n for n in (name, f"{name}-guided") if n in reports), None)


def summarise(reports: dict[str, dict[int, dict]], seeds: list[int]) -> tuple[str, dict]:
    """The Markdown report and its JSON twin from ``reports[variant][seed]``."""
    names = list(reports)
    lines = ["| Method | R1 | R5 | R10 | mAP | attention AUC A_S | A_T | IoU A_S | A_T | s/run |",
             "|:---|" + "---:|" * 9]
    data: dict = {"seeds": seeds, "variants": {}, "orderings": []}
    for name in names:
        rs = [reports[name][s] for s in seeds]
        metrics = {k: [r["metrics"][k] for r in rs] for k in METRIC_KEYS}
        att = [r.get("attention_quality") for r in rs]
        has_att = all(a is not None for a in att)

        def att_values(net, key):
            return [a[net][key] for a in att] if has_att else []

        lines.append("| " + " | ".join([
            method_name(rs[0]["config"]), *(_pm(metrics[k]) for k in ("rank1", "rank5",
                                                                        "rank10", "mAP")),
            _pm(att_values("A_S", "auc"), 1, 2), _pm(att_values("A_T", "auc"), 1, 2),
            _pm(att_values("A_S", "iou"), 1, 2), _pm(att_values("A_T", "iou"), 1, 2),
            f"{statistics.fmean(r['seconds'] for r in rs):.0f}"]) + " |")
        data["variants"][name] = {"method": method_name(rs[0]["config"]), "metrics": metrics,
                                  "attention": att if has_att else None,
                                  "seconds": [r["seconds"] for r in rs]}
    lines += ["", "Target mAP (%) seed by seed:", "",
              "| Method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|:---|" + "---:|" * len(seeds)]
    for name in names:
        lines.append(f"| {data['variants'][name]['method']} | "
                     + " | ".join(f"{100 * reports[name][s]['metrics']['mAP']:.1f}"
                                  for s in seeds) + " |")
    lines += ["", "The paper's orderings on target mAP (paired by seed):", "",
              "| ordering | gap per seed (mAP points) | holds on every seed | mean gap ± std |",
              "|:---|:---|:---:|---:|"]
    for better, worse, how in ORDERINGS:
        better, worse = _ran(better, reports), _ran(worse, reports)
        if better is None or worse is None:
            continue
        gaps = [100 * (reports[better][s]["metrics"]["mAP"] - reports[worse][s]["metrics"]["mAP"])
                for s in seeds]
        holds = all(g > 0 if how == ">" else g >= 0 for g in gaps)
        m, sd = _mean_std(gaps)
        label = (f"{data['variants'][better]['method']} {how} "
                 f"{data['variants'][worse]['method']}")
        lines.append(f"| {label} | {', '.join(f'{g:+.1f}' for g in gaps)} | "
                     f"{'yes' if holds else 'no'} | {m:+.1f} ± {sd:.1f} |")
        data["orderings"].append({"better": better, "worse": worse, "relation": how,
                                  "gaps": gaps, "holds": holds, "mean": m, "std": sd})
    return "\n".join(lines) + "\n", data


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", default="runs/variants",
                   help="one sub-folder per run, plus variants.md/json (default: runs/variants)")
    p.add_argument("--variants", default=TABLE_V,
                   help=f"comma-separated variant names (default: {TABLE_V})")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of every run (default: the preset's, 40 for tiny)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)),
                   help="runs at a time (default: one per core)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per run (default: 1)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="train with --amp (default: off, float32)")
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    for name in names:
        variant_args(name)  # fail before training anything
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed) for seed in seeds for name in names]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(lambda job: (job, _run(*job, out, args, extra)), jobs))
    reports: dict[str, dict[int, dict]] = {name: {} for name in names}
    for (name, seed), report in done:
        reports[name][seed] = report
    text, data = summarise(reports, seeds)
    command = " ".join(["python", "benchmarks/compare_variants.py", *sys.argv[1:]])
    (out / "variants.md").write_text(f"`{command}`\n\n{text}")
    (out / "variants.json").write_text(json.dumps(data, indent=1) + "\n")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
