"""Training throughput of the ``paper`` preset on a GPU: images/s and the fraction of the GPU's
matmul peak, per precision, with and without ``torch.compile``, fed from memory or by a loader.

    python -m benchmarks.gpu_throughput --json gpu-check/throughput.json \
        --markdown gpu-check/throughput.md [--budget-s 420] [--steps 20]

Grid (each row: ``--warmup`` untimed steps, then the median of ``--steps`` synchronised
steps): precisions ``fp32``, ``fp16`` (autocast + one GradScaler per optimiser), ``bf16``;
``compile`` off and on (every sub-network, ``nn.Module.compile``; its compile time is reported
as ``warmup_s``); input ``memory`` (one fixed batch on the GPU: the step alone), ``torch`` (the
trainer's DataLoader: PK-sampled source and random target batches of the embedded ``paper``
set, 4 workers, pinned memory) and ``dali`` (the DALI pipeline, GPU decode; skipped with the
reason when DALI is not installed). ``images/s`` counts source + target images (2 x
``--batch``). FLOPs per step come from ``torch.utils.flop_counter`` (convolutions and matmuls,
forward and backward); the peak is the best ``torch.mm`` of 8192-square matrices in the row's
compute dtype (TF32 off for float32), measured in the same run.

The loader rows read the embedded ``paper`` synthetic set from the data cache; ``gpu_check``
runs this after its ``paper`` training steps, which render it. Rows are run in order until
``--budget-s`` is spent; the rest are listed as not run. Exit status 0 (also with rows skipped),
2 for bad arguments or no GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks._step import PRECISIONS, make_step
from benchmarks._timing import _sync, interleaved
from benchmarks.profile_train_step import gemm_peak, machine, step_flops
from edaan_fast._allocator import pin_malloc_thresholds
from edaan_fast.engine.execution import ExecutionOptions, to_layout

INPUTS = ("memory", "torch", "dali")


def _loader_batches(kind: str, preset: str, batch: int, device: str):
    """``(number of source identities, an endless iterator of (x_s, labels, x_t) on
    device)`` from the trainer's loaders."""
    from edaan_fast.data import PKSampler, RandomBatchSampler, build_loader
    from edaan_fast.engine.run_config import RunConfig, source_dataset, target_dataset

    run = RunConfig(preset=preset, loader=kind).resolve().to_dict()
    source, target = source_dataset(run), target_dataset(run)
    size = tuple(run["image_size"])
    common = {"loader": kind, "train": True, "num_workers": 4, "image_size": size,
              "pin_memory": kind == "torch", "device": device}
    src = build_loader(source.train, sampler=PKSampler(source.train, batch // 4, 4, seed=0),
                       **common)
    tgt = build_loader(target.train, sampler=RandomBatchSampler(len(target.train), batch,
                                                                seed=1), **common)

    def forever(loader):
        while True:
            yield from loader

    def batches():
        for s, t in zip(forever(src), forever(tgt)):
            yield (s.images.to(device, non_blocking=True),
                   s.pids.to(device, non_blocking=True), t.images.to(device, non_blocking=True))

    return source.num_train_pids, batches()


def measure_row(preset: str, batch: int, precision: str, compiled: bool, source: str,
                device: str, steps: int, warmup: int) -> dict:
    """One row of the grid (see the module docstring)."""
    options = ExecutionOptions(compile=compiled)
    num_ids, feed = None, None
    if source != "memory":
        num_ids, feed = _loader_batches(source, preset, batch, device)
    setup = make_step(preset, batch, device, precision, options, num_ids=num_ids)

    def one():
        if feed is None:
            return setup.run()
        x_s, labels, x_t = next(feed)
        return setup.run_on(to_layout(x_s, options), labels, to_layout(x_t, options))

    _sync(device)
    start = time.perf_counter()
    for _ in range(warmup):
        one()
    _sync(device)
    warmup_s = time.perf_counter() - start
    seconds = interleaved({"step": one}, steps, device=device, warmup=0)["step"]
    flops, _ = step_flops(setup)
    return {"preset": preset, "precision": precision, "compile": compiled, "input": source,
            "step_ms": seconds * 1e3, "images_per_s": setup.images_per_step / seconds,
            "warmup_s": warmup_s, "tflop_per_step": flops / 1e12,
            "achieved_tflops": flops / seconds / 1e12,
            "peak_dtype": str(PRECISIONS[precision] or torch.float32).replace("torch.", "")}


def grid(precisions, compiles, inputs) -> list[tuple[str, bool, str]]:
    """The rows in the order they run: every eager row before the compiled ones (which pay
    their compilation first), inputs and precisions within."""
    return [(p, c, i) for c in compiles for i in inputs for p in precisions]


def run_grid(args) -> list[dict]:
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 peak is float32
    torch.backends.cudnn.allow_tf32 = False
    peaks = {}
    rows, deadline = [], time.monotonic() + args.budget_s
    compiles = [c == "on" for c in args.compile.split(",")]
    for precision, compiled, source in grid(args.precision.split(","), compiles,
                                            args.inputs.split(",")):
        row = {"preset": args.preset, "precision": precision, "compile": compiled,
               "input": source}
        if time.monotonic() > deadline:
            rows.append({**row, "skipped": "budget spent"})
            continue
        try:
            row = measure_row(args.preset, args.batch, precision, compiled, source,
                              args.device, args.steps, args.warmup)
        except ImportError as exc:  # DALI not installed
            rows.append({**row, "skipped": str(exc).splitlines()[0]})
            continue
        dtype = PRECISIONS[precision] or torch.float32
        if dtype not in peaks:
            peaks[dtype] = gemm_peak(dtype, args.device,
                                     size=8192 if args.device == "cuda" else 1024)
        row["peak_tflops"] = peaks[dtype] / 1e12
        row["fraction_of_peak"] = row["achieved_tflops"] / row["peak_tflops"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    out = [("| precision | compile | input | step ms | images/s | warm-up s | TFLOP/s | "
            "peak TFLOP/s | of peak |"), "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['precision']} | {r['compile']} | {r['input']} | "
                       f"not run: {r['skipped']} | | | | | |")
            continue
        out.append(f"| {r['precision']} | {r['compile']} | {r['input']} | {r['step_ms']:.1f} "
                   f"| {r['images_per_s']:.0f} | {r['warmup_s']:.0f} | "
                   f"{r['achieved_tflops']:.1f} | {r['peak_tflops']:.0f} ({r['peak_dtype']}) | "
                   f"{100 * r['fraction_of_peak']:.1f}% |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    pin_malloc_thresholds()  # as the trainer does: no page faults on every large allocation
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", default="fp32,fp16,bf16")
    p.add_argument("--inputs", default=",".join(INPUTS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--device", default="cuda", help="cpu: a rehearsal of the code paths")
    p.add_argument("--compile", default="off,on", help="off, on or both")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    bad = [q for q in args.precision.split(",") if q not in PRECISIONS]
    bad += [i for i in args.inputs.split(",") if i not in INPUTS]
    bad += [c for c in args.compile.split(",") if c not in ("off", "on")]
    if bad or args.batch < 8 or args.batch % 4:
        print(f"gpu_throughput: error: unknown precision/input/compile {bad} or --batch not a multiple "
              f"of 4 >= 8 ({args.batch})", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_throughput: error: no CUDA device is visible", file=sys.stderr)
        return 2
    rows = run_grid(args)
    header = f"{machine(args.device)}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}"
    table = markdown(rows)
    print(header + "\n\n" + table)
    for path, text in ((args.markdown, header + "\n\n" + table + "\n"),
                       (args.json, json.dumps({"machine": header, "rows": rows}, indent=1))):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
