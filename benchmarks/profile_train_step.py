"""Where one EDAAN training step spends its time, and how far it is from the machine's peak.

    python -m benchmarks.profile_train_step --preset tiny --precision bf16
    python -m benchmarks.profile_train_step --preset paper --batch 8 --precision fp32,bf16
    python -m benchmarks.profile_train_step --device cuda --preset paper --precision bf16,fp16
    python -m benchmarks.profile_train_step --compare fp32:eager,bf16:base,bf16:compile --rounds 20

For each preset x precision it builds the step the trainer runs (``benchmarks/_step.py``: the
engine's model, optimisers and execution options; a PK batch of ``--batch`` source and
``--batch`` target images; the first phase), and reports:

* **step time**: the median of ``--steps`` steps after two warm-up steps, without the profiler;
* **per network**: forward and backward time of ``A``, ``E``, ``G``, ``D`` and the re-ID head
  (both domains summed), from one profiled step. Each network's forward runs inside a
  ``record_function`` range; a backward node is given to the network whose forward op created
  it (autograd's sequence number). What no network owns (losses, ``mask_blend``, image pools,
  optimiser, Python) is "rest";
* **per kind of op** (exclusive time of each op, from the same profiled step): convolution and
  matmul, normalisation, elementwise and reductions, data movement (copies, padding,
  upsampling, concatenation, casts), optimiser (everything inside ``Optimizer.step`` /
  ``zero_grad``), and host overhead (the profiled step's wall time minus the time inside ops:
  Python, autograd bookkeeping, the dispatcher; the profiler's own cost inflates it, so the
  profiled and unprofiled step times are both printed);
* **FLOPs** of the step (``torch.utils.flop_counter.FlopCounterMode``: convolutions and
  matmuls, forward and backward) and the **achieved FLOP/s** against the **peak** of the same
  machine in the same run: the best of a few ``torch.mm`` of ``--gemm-size`` squared matrices
  in the step's compute dtype (float32, or bfloat16/float16 under autocast), on the threads the
  step uses. Per network group, its forward FLOPs are listed too.

On CUDA the per-network and per-kind times are device (kernel) times, the wall time is the
synchronised step, and the host overhead is the time the GPU ran no kernel of the step.
``--compile`` compiles every sub-network first (the per-network split is then not available:
compiled graphs run as one region). ``--compare A,B,...`` instead times
``[precision:]variant`` steps (:data:`VARIANTS`; ``eager`` is the step before the throughput
work: Adam's per-parameter loop and the plain ``ReflectionPad2d`` + ``Conv2d`` output layers,
``plain-layers`` the trainer's step with those layers alone) interleaved, step by step, after two warm-up steps each, and
prints medians and ratios to the first. ``--trainer-costs DIR`` times what the default run does
besides its steps (evaluation, attention measurement, image grid, checkpoint, batch loading).
``--json`` writes everything; ``--markdown`` the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._step import PRECISIONS, make_step
from benchmarks._timing import _sync, interleaved
from edaan_fast._allocator import pin_malloc_thresholds
from edaan_fast.engine.execution import ExecutionOptions
from edaan_fast.models import blocks

#: Sub-network attribute -> the group it is reported in.
NETWORKS = {"attention_S": "A", "attention_T": "A", "encoder_S": "E", "encoder_T": "E",
            "generator_S": "G", "generator_T": "G", "discriminator_S": "D",
            "discriminator_T": "D", "reid_head": "re-ID head"}
GROUPS = ("A", "E", "G", "D", "re-ID head", "rest")
KINDS = ("convolution/matmul", "normalisation", "elementwise/reduction", "data movement",
         "optimiser", "host overhead")

#: Execution variants for ``--compare`` (and the bench file): name -> options.
VARIANTS = {
    "base": ExecutionOptions(),
    "eager": ExecutionOptions(fused_optimizer=False),
    "channels-last": ExecutionOptions(channels_last=True),
    "compile": ExecutionOptions(compile=True),
    "plain-layers": ExecutionOptions(),
}
#: Variants that run the output layers as plain modules instead of the fused
#: ``reflect_pad_conv2d`` (:data:`edaan_fast.models.blocks.FUSED_OUTPUT_CONV`, set per step).
PLAIN_LAYERS = frozenset({"eager", "plain-layers"})

_CONV = ("conv", "mkldnn_convolution", "addmm", "mm", "bmm", "matmul", "linear", "baddbmm")
_NORM = ("batch_norm", "instance_norm", "layer_norm", "group_norm", "var_mean", "_norm")
_MOVE = ("copy", "_to_copy", "to", "cat", "stack", "clone", "contiguous", "pad", "reflection",
         "upsample", "index", "slice", "select", "gather", "scatter", "fill", "zero", "flip",
         "narrow", "split", "chunk", "expand", "repeat", "where", "masked")


def classify(name: str) -> str | None:
    """The kind of an op by its profiler name (``aten::...``, ``edaan_fast::...``); ``None``
    for what is not an op (ranges, autograd nodes: host overhead)."""
    if not name.startswith(("aten::", "edaan_fast::")):
        return None
    op = name.split("::", 1)[1]
    if any(op == c or op.startswith(c) for c in _CONV) and "backward" not in op.replace(
            "convolution_backward", ""):
        return "convolution/matmul"
    if any(n in op for n in _NORM):
        return "normalisation"
    if any(op == m or op.startswith(m) or m in op.split("_") for m in _MOVE):
        return "data movement"
    return "elementwise/reduction"


def _label_networks(model) -> list:
    """Forward hooks that open a ``net::<group>`` profiler range around each sub-network."""
    handles, seen = [], set()
    for attr, group in NETWORKS.items():
        net = getattr(model, attr, None)
        if net is None or id(net) in seen:
            continue
        seen.add(id(net))

        def enter(module, args, group=group):
            module._profile_range = record_function(f"net::{group}")
            module._profile_range.__enter__()

        def leave(module, args, out):
            module._profile_range.__exit__(None, None, None)

        handles += [net.register_forward_pre_hook(enter), net.register_forward_hook(leave)]
    return handles


def _timings(event, cuda: bool) -> tuple[float, float]:
    """(inclusive, exclusive) microseconds: device time on CUDA, CPU time otherwise."""
    if cuda:
        return event.device_time_total, event.self_device_time_total
    return event.cpu_time_total, event.self_cpu_time_total


def _ancestor(event, prefixes: tuple[str, ...]):
    e = event.cpu_parent
    while e is not None:
        if e.name.startswith(prefixes):
            return e
        e = e.cpu_parent
    return None


def analyse(events, cuda: bool) -> dict:
    """Per-network (forward, backward) and per-kind milliseconds of one profiled step."""
    step = next(e for e in events if e.name == "train_step")
    nets: dict[str, list[float]] = {g: [0.0, 0.0] for g in GROUPS}
    kinds: dict[str, float] = defaultdict(float)
    seq_owner: dict[int, str] = {}
    in_ops = 0.0
    for e in events:
        total, self_ = _timings(e, cuda)
        if e.name.startswith("net::"):
            nets[e.name[5:]][0] += total
        owner = _ancestor(e, ("net::",))
        if owner is not None and e.sequence_nr >= 0:
            seq_owner.setdefault(e.sequence_nr, owner.name[5:])
    for e in events:
        total, self_ = _timings(e, cuda)
        if e.name.startswith("autograd::engine::evaluate_function:") and e.sequence_nr >= 0:
            group = seq_owner.get(e.sequence_nr)
            if group is not None:
                nets[group][1] += total
        kind = classify(e.name)
        if _ancestor(e, ("Optimizer.",)) is not None or e.name.startswith("Optimizer."):
            kind = "optimiser" if kind is not None or e.name.startswith("Optimizer.") else None
        if kind is not None:
            kinds[kind] += self_
            in_ops += self_
    # the step's wall time (on CUDA the range ends after a synchronize): what no op filled is
    # host overhead -- Python and autograd on the CPU, the GPU's idle time on CUDA
    wall = step.cpu_time_total
    kinds["host overhead"] = max(0.0, wall - in_ops)
    named = sum(f + b for g, (f, b) in nets.items() if g != "rest")
    nets["rest"] = [max(0.0, wall - named), 0.0]
    ms = 1e-3
    return {"profiled_step_ms": wall * ms,
            "networks_ms": {g: {"forward": f * ms, "backward": b * ms} for g, (f, b) in
                            nets.items()},
            "kinds_ms": {k: kinds.get(k, 0.0) * ms for k in KINDS}}


# ---------------------------------------------------------------------- FLOPs and the peak


def step_flops(setup) -> tuple[int, dict[str, int]]:
    """FLOPs of one step (forward + backward: convolutions and matmuls) and the *forward*
    FLOPs of each network group (counted between its forward hooks; the module tracker of
    ``FlopCounterMode`` mixes up backward passes of modules called several times a step)."""
    counter = FlopCounterMode(display=False, depth=1)
    forward: dict[str, int] = defaultdict(int)
    handles, seen = [], set()
    for attr, group in NETWORKS.items():
        net = getattr(setup.model, attr, None)
        if net is None or id(net) in seen:
            continue
        seen.add(id(net))

        def enter(module, args):
            module._flops_before = counter.get_total_flops()

        def leave(module, args, out, group=group):
            forward[group] += counter.get_total_flops() - module._flops_before

        handles += [net.register_forward_pre_hook(enter), net.register_forward_hook(leave)]
    try:
        with counter:
            setup.run()
    finally:
        for h in handles:
            h.remove()
    return counter.get_total_flops(), dict(forward)


def gemm_peak(dtype: torch.dtype, device: str, size: int = 2048, repeats: int = 5) -> float:
    """The machine's matmul FLOP/s in ``dtype``: the best of ``repeats`` ``size``-square
    ``torch.mm`` (after one warm-up), on the current number of threads."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


# ---------------------------------------------------------------------- measurements


def median_step_seconds(run, device: str, steps: int, warmup: int = 2) -> float:
    return interleaved({"step": run}, steps, device=device, warmup=warmup)["step"]


def profile_one(preset: str, batch: int, device: str, precision: str, steps: int,
                options: ExecutionOptions, gemm_size: int) -> dict:
    """Every figure of the module docstring for one preset and precision."""
    setup = make_step(preset, batch, device, precision, options)
    seconds = median_step_seconds(setup.run, device, steps)
    cuda = torch.device(device).type == "cuda"
    handles = [] if options.compile else _label_networks(setup.model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof, record_function("train_step"):
        setup.run()
        _sync(device)
    for h in handles:
        h.remove()
    breakdown = analyse(prof.events(), cuda)
    flops, flops_groups = step_flops(setup)
    compute = PRECISIONS[precision] or torch.float32
    peak = gemm_peak(compute, device, gemm_size)
    return {"preset": preset, "batch": f"{batch}+{batch}", "device": device,
            "precision": precision, "options": dataclasses.asdict(options), "step_ms": seconds * 1e3,
            "images_per_s": setup.images_per_step / seconds, **breakdown,
            "network_split": not options.compile, "gflop": flops / 1e9,
            "gflop_per_network": {k: v / 1e9 for k, v in flops_groups.items()},
            "achieved_gflops": flops / seconds / 1e9, "peak_gflops": peak / 1e9,
            "peak_dtype": str(compute).replace("torch.", ""),
            "fraction_of_peak": flops / seconds / peak}


def parse_variant(name: str, precision: str) -> tuple[str, ExecutionOptions]:
    """``[precision:]variant`` (``bf16:compile``, ``eager``) -> (precision, options)."""
    prec, _, variant = name.rpartition(":")
    prec = prec or precision
    if prec not in PRECISIONS or variant not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}: [precision:]variant with a precision of "
                         f"{', '.join(PRECISIONS)} and a variant of {', '.join(VARIANTS)}")
    return prec, VARIANTS[variant]


def _layers(run, fused: bool):
    """``run`` with the fused output layers on or off for its calls (a module switch, so that
    interleaved variants each run their own)."""
    def call():
        saved, blocks.FUSED_OUTPUT_CONV = blocks.FUSED_OUTPUT_CONV, fused
        try:
            return run()
        finally:
            blocks.FUSED_OUTPUT_CONV = saved
    return call


def compare(names: list[str], preset: str, batch: int, device: str, precision: str,
            rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per step of each ``[precision:]variant``, interleaved step by step, and
    the seconds of each one's two warm-up steps (compilation, allocator, oneDNN caches)."""
    specs = {n: parse_variant(n, precision) for n in names}
    runs = {n: _layers(make_step(preset, batch, device, p, o).run,
                       n.rpartition(":")[2] not in PLAIN_LAYERS)
            for n, (p, o) in specs.items()}
    warmup = {}
    for n, run in runs.items():
        start = time.perf_counter()
        run()
        run()
        _sync(device)
        warmup[n] = time.perf_counter() - start
    return interleaved(runs, rounds, device=device, warmup=0), warmup


def trainer_costs(output_dir: Path, repeats: int = 3) -> dict[str, float]:
    """Median seconds of what the default run (``train --amp``) does besides its steps: one
    target evaluation, one attention measurement, one image grid, one checkpoint, and the
    loading of one source + one target batch (``num_workers`` 0, the CPU default)."""
    from edaan_fast.engine.hooks import write_image_grid
    from edaan_fast.engine.run_config import RunConfig
    from edaan_fast.engine.trainer import Trainer

    trainer = Trainer(RunConfig(amp=True, output_dir=str(output_dir), progress=False),
                      overwrite=True)
    output_dir.mkdir(parents=True, exist_ok=True)

    def batches():
        source, target = iter(trainer.source_loader), iter(trainer.target_loader)
        next(source), next(target)

    jobs = {"target evaluation": trainer.evaluate, "attention measurement":
            trainer.measure_attention, "image grid": lambda: write_image_grid(trainer),
            "checkpoint": trainer.save, "source + target batch": batches}
    costs = {}
    for name, job in jobs.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            job()
            times.append(time.perf_counter() - start)
        costs[name] = statistics.median(times)
    return costs


# ---------------------------------------------------------------------- output


def markdown(rows: list[dict]) -> str:
    """The tables of RESULTS.md: one column per preset x precision."""
    heads = [f"{r['preset']} {r['precision']}" for r in rows]
    out = ["| | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(rows)]

    def line(label: str, cells: list[str]) -> None:
        out.append(f"| {label} | " + " | ".join(cells) + " |")

    line("step (median, unprofiled)", [f"{r['step_ms']:.0f} ms" for r in rows])
    line("images/s", [f"{r['images_per_s']:.1f}" for r in rows])
    line("step under the profiler", [f"{r['profiled_step_ms']:.0f} ms" for r in rows])
    for g in GROUPS:
        line(f"{g}: forward + backward", [
            (f"{r['networks_ms'][g]['forward']:.0f} + {r['networks_ms'][g]['backward']:.0f} ms "
             f"({_share(r, sum(r['networks_ms'][g].values()))})") if r["network_split"]
            else "n/a" for r in rows])
    for k in KINDS:
        line(k, [f"{r['kinds_ms'][k]:.0f} ms ({_share(r, r['kinds_ms'][k])})" for r in rows])
    line("GFLOP per step", [f"{r['gflop']:.2f}" for r in rows])
    line("forward GFLOP: A / E / G / D / head", [" / ".join(
        f"{r['gflop_per_network'].get(g, 0):.2f}" for g in GROUPS[:5]) for r in rows])
    line("achieved GFLOP/s", [f"{r['achieved_gflops']:.1f}" for r in rows])
    line("peak GFLOP/s (GEMM)", [f"{r['peak_gflops']:.0f} ({r['peak_dtype']})" for r in rows])
    line("fraction of peak", [f"{100 * r['fraction_of_peak']:.1f}%" for r in rows])
    return "\n".join(out)


def _share(row: dict, ms: float) -> str:
    return f"{100 * ms / row['profiled_step_ms']:.0f}%"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="tiny, paper or both: tiny,paper")
    p.add_argument("--precision", default="fp32,bf16", help="fp32, bf16, fp16 (comma list)")
    p.add_argument("--batch", type=int, default=16, help="source images (as many target)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--compile", action="store_true", help="torch.compile every sub-network")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--gemm-size", type=int, default=2048)
    p.add_argument("--compare", help="[precision:]variant list to time interleaved, e.g. "
                   f"fp32:eager,bf16:base (variants: {', '.join(VARIANTS)})")
    p.add_argument("--rounds", type=int, default=20, help="--compare: interleaved rounds")
    p.add_argument("--trainer-costs", type=Path, metavar="DIR",
                   help="time the default run's evaluation, attention measurement, image "
                        "grid, checkpoint and batch loading (a scratch run folder DIR)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    pin_malloc_thresholds()  # as the trainer does: no page faults on every large allocation
    args = _parser().parse_args(argv)
    presets, precisions = args.preset.split(","), args.precision.split(",")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or args.batch < 8 or args.batch % 4:
        print(f"profile_train_step: error: --precision must be among {', '.join(PRECISIONS)} "
              f"and --batch a multiple of 4 >= 8; got {args.precision}, {args.batch}",
              file=sys.stderr)
        return 2
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("profile_train_step: error: --device cuda but no CUDA device is visible",
              file=sys.stderr)
        return 2
    header = f"{machine(args.device)}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}"
    print(header)
    if args.trainer_costs:
        costs = trainer_costs(args.trainer_costs)
        for name, sec in costs.items():
            print(f"{name:<24} {sec * 1e3:9.1f} ms")
        result = {"machine": header, "trainer_costs": costs}
    elif args.compare:
        try:
            med, warmup = compare(args.compare.split(","), presets[0], args.batch,
                                  args.device, precisions[0], args.rounds)
        except ValueError as exc:
            print(f"profile_train_step: error: {exc}", file=sys.stderr)
            return 2
        first = next(iter(med.values()))
        for n, sec in med.items():
            print(f"{n:<20} {sec * 1e3:9.1f} ms/step  {first / sec:5.2f}x  "
                  f"({args.batch * 2 / sec:.1f} images/s; warm-up {warmup[n]:.1f} s)")
        result = {"machine": header, "compare": med, "warmup_s": warmup}
    else:
        options = ExecutionOptions(channels_last=args.channels_last, compile=args.compile)
        rows = [profile_one(p, args.batch, args.device, q, args.steps, options, args.gemm_size)
                for p in presets for q in precisions]
        table = markdown(rows)
        print(table)
        if args.markdown:
            args.markdown.write_text(header + "\n\n" + table + "\n")
        result = {"machine": header, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


def machine(device: str) -> str:
    """The processor (or GPU) and the threads a measurement ran on."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


if __name__ == "__main__":
    sys.exit(main())
