"""One command that verifies the CUDA path on a GPU machine (no internet needed):

    python -m edaan_fast.gpu_check [--out gpu-check] [--budget 480]

It runs, each step as a subprocess with its own time limit, in priority order (most important
first, so that a short loan of a GPU answers what matters), and stops cleanly at the budget:
a step that would be cut off is not started, and the summary lists what was skipped. Steps are
registered in one line each (:func:`register`, with a priority); the plan by default:

1. every test marked ``cuda`` with ``EDAAN_FAST_REQUIRE_CUDA=1`` (a missing kernel or an
   invisible GPU fails instead of skipping);
2. one short epoch of the ``paper`` preset with ``--amp`` in float16 (GradScaler) and in
   bfloat16 (peak GPU memory recorded in the run's report);
3. the GPU benchmarks in quick mode: mask_blend bandwidth against a copy, the metric losses
   against eager, rank evaluation from features, re-ranking;
4. ``evaluate`` of the float16 run on CUDA and on the CPU (the metrics must agree); then the
   MSMT17-sized exact re-ranking from features on the GPU (11,659 x 82,161, 128-d:
   seconds, the GPU's full-float32 GEMM rate, and the ratio to the FLOP floor 2.25 TFLOP / rate,
   target <= 1.5x: a miss is reported as ``missed``, not as a failure); a resume from the float16
   run's checkpoint, an epoch with ``--loader dali``;
5. two data-parallel processes on the one GPU (gloo) -- identical weights, metric term > 0;
6. ``compute-sanitizer`` memcheck and racecheck on a small subset of the op tests, where the
   tool exists.

``--cpu-rehearsal`` runs the steps that need no GPU (3 to 5 and the cross-checks) on the CPU
with the ``tiny`` preset (the float16 run in float32; the re-ranking at 1,000 x 6,000, its
ratio not judged), so that the commands, the files they
write and the checks that read them are proven before a GPU session spends its time on them.

It writes ``gpu_check.json`` (every step: command, status -- passed, failed, stopped by the
budget, skipped, or missed for a speed target --, exit status, seconds, output tail) and ``gpu_check.md`` (a table and what
was left out) into ``--out``, after every step. The tests and benchmarks are read from the source
tree (``--source``, default: the checkout this package was imported from). Without a visible
GPU it prints what it would run and exits 0. Exit status: 0 when every step passed, 1
otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Context", "Step", "main", "plan", "register"]

# The op tests the sanitizers run: small, and every kernel family is in them.
SANITIZER_TESTS = ("tests/test_mask_blend.py tests/test_metric_losses.py tests/test_rank_eval.py"
                   " -m cuda -k 'not compile and not large and not market' -q -x")
QUICK_BENCH = ("benchmarks/bench_mask_blend.py benchmarks/bench_metric_losses.py "
               "benchmarks/bench_rank_eval.py benchmarks/bench_reranking.py")


#: Where the MSMT17-sized re-ranking step writes its figures (under ``--out``).
MSMT17_JSON = "msmt17_rerank.json"

#: The steps a CPU rehearsal leaves out.
REHEARSAL_SKIPS = ("cuda tests", "gpu benchmarks", "train paper dali", "train step throughput",
                   "train step profile", "memcheck", "racecheck")


@dataclass
class Step:
    """One verification step: a shell command run from the source tree."""

    name: str
    command: str
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)
    needs: str | None = None  # an executable that must exist (else the step is skipped)


@dataclass
class Context:
    """What a step's command is built from: the interpreter, the output folder, the device and
    preset of this run (``cpu``/``tiny`` in a rehearsal)."""

    out: Path
    rehearsal: bool = False
    py: str = sys.executable

    @property
    def gpu(self) -> str:
        return "cpu" if self.rehearsal else "cuda"

    @property
    def preset(self) -> str:
        return "tiny" if self.rehearsal else "paper"

    def train(self, name: str, extra: str) -> str:
        iters = 5 if self.rehearsal else 20
        if self.rehearsal:  # float16 autocast runs through slow reference kernels on a CPU
            extra = extra.replace("--amp --amp-dtype float16", "--no-amp")
        return (f"{self.py} -m edaan_fast.train --preset {self.preset} --epochs 1 "
                f"--iters-per-epoch {iters} --eval-every 0 --checkpoint-every 1 --device "
                f"{self.gpu} --output-dir {self.out / name} --overwrite {extra}")

    def evaluate(self, device: str, output: str) -> str:
        return (f"{self.py} -m edaan_fast.evaluate --checkpoint {self.out / 'fp16' / 'final.pt'} "
                f"--dataset synthetic --device {device} --output {self.out / output}")


#: The registered steps: (priority, builder). Lower priorities run first, so a short loan of a
#: GPU gets the most important answers before the budget ends: correctness of every op against
#: the CPU, one paper-preset step in each precision, the benchmarks, the evaluations, then the
#: rest, and the sanitizers last.
_REGISTRY: list[tuple[int, Callable[[Context], Step]]] = []
#: Seconds for all steps unless ``--budget`` says otherwise: what a short loan of a GPU spends.
DEFAULT_BUDGET_S = 480.0


def register(priority: int, build: Callable[[Context], Step]) -> None:
    """Adds a step to every plan: one line, ``register(35, lambda c: Step("name", command,
    timeout_s))``; ``c`` is the plan's :class:`Context`."""
    _REGISTRY.append((priority, build))


register(10, lambda c: Step("cuda tests", f"{c.py} -m pytest tests -m cuda -q -ra -p "
                            "no:cacheprovider", 240, {"EDAAN_FAST_REQUIRE_CUDA": "1"}))
register(20, lambda c: Step("train paper fp16", c.train("fp16", "--amp --amp-dtype float16"), 90))
register(21, lambda c: Step("train paper bf16", c.train("bf16", "--amp --amp-dtype bfloat16"), 90))
register(30, lambda c: Step("gpu benchmarks", f"{c.py} -m pytest {QUICK_BENCH} --benchmark-only "
                            f"-q -o python_files='bench_*.py' --benchmark-json="
                            f"{c.out / 'benchmarks.json'}", 150, {"EDAAN_FAST_BENCH_QUICK": "1"}))
register(40, lambda c: Step("evaluate cuda", c.evaluate(c.gpu, "eval_cuda.json"), 60))
register(41, lambda c: Step("evaluate cpu", c.evaluate("cpu", "eval_cpu.json"), 120))
# after the correctness steps: exact re-ranking at MSMT17 size against its FLOP floor
register(45, lambda c: Step("msmt17 re-ranking", f"{c.py} -m benchmarks.bench_reranking --msmt17 "
                            f"--device {c.gpu} {'--shape 1000,6000,128 ' if c.rehearsal else ''}"
                            f"--json {c.out / MSMT17_JSON}", 180))
# resumes the run's last state (RNG, scalers, optimisers) and evaluates it again
register(50, lambda c: Step("resume fp16", c.train("fp16", "--amp --amp-dtype float16 --resume "
                            f"{c.out / 'fp16' / 'checkpoint.pt'}").replace(" --overwrite", ""), 90))
register(60, lambda c: Step("train paper dali", c.train("dali", "--amp --loader dali --epochs 2"), 90))
# images/s of the paper preset's step (fp32/fp16/bf16, eager and compiled, from memory and
# through the torch and DALI loaders; reads the paper data the step above rendered) and the
# profile of one step by network and kind of op
register(61, lambda c: Step("train step throughput", f"{c.py} -m benchmarks.gpu_throughput "
                            f"--budget-s 240 --json {c.out / 'throughput.json'} --markdown "
                            f"{c.out / 'throughput.md'}", 300))
register(62, lambda c: Step("train step profile", f"{c.py} -m benchmarks.profile_train_step "
                            "--device cuda --preset paper --precision fp32,bf16,fp16 --json "
                            f"{c.out / 'profile.json'} --markdown {c.out / 'profile.md'}", 180))
register(70, lambda c: Step("ddp two processes", f"{c.py} -m torch.distributed.run "
                            f"--nproc_per_node 2 -m edaan_fast.train --preset {c.preset} --epochs 1 "
                            f"--iters-per-epoch 5 --eval-every 0 --device {c.gpu}"
                            f"{'' if c.rehearsal else ':0'} --output-dir {c.out / 'ddp'} "
                            "--overwrite", 120, {"EDAAN_FAST_DIST_BACKEND": "gloo"}))
register(90, lambda c: Step("memcheck", f"compute-sanitizer --tool memcheck --error-exitcode 1 "
                            f"{c.py} -m pytest {SANITIZER_TESTS}", 120, needs="compute-sanitizer"))
register(91, lambda c: Step("racecheck", f"compute-sanitizer --tool racecheck --error-exitcode 1 "
                            f"{c.py} -m pytest {SANITIZER_TESTS}", 120, needs="compute-sanitizer"))


def plan(out: Path, rehearsal: bool = False) -> list[Step]:
    """The registered steps in priority order, writing their runs under ``out``; with
    ``rehearsal`` the ones that run on a CPU, on the CPU, with the ``tiny`` preset."""
    ctx = Context(out, rehearsal)
    steps = [build(ctx) for _, build in sorted(_REGISTRY, key=lambda e: e[0])]
    if rehearsal:  # what needs a GPU (kernels, DALI's GPU decode, the sanitizers) is left out
        steps = [s for s in steps if s.name not in REHEARSAL_SKIPS]
    return steps


def _run(step: Step, source: Path, left_s: float) -> dict:
    """Runs one step; its record for the summary."""
    record = {**asdict(step), "status": "skipped", "rc": None, "seconds": 0.0, "tail": ""}
    if step.needs and shutil.which(step.needs) is None:
        record["tail"] = f"{step.needs} not found"
        return record
    limit = min(step.timeout_s, left_s)
    if limit < max(5.0, step.timeout_s / 3):  # it would only be cut off: leave it for later
        record["tail"] = f"time budget spent ({left_s:.0f} s left of the budget)"
        return record
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(source), os.environ.get("PYTHONPATH")])), **step.env}
    start = time.perf_counter()
    try:
        proc = subprocess.run(step.command, shell=True, cwd=source, env=env, timeout=limit,
                              capture_output=True, text=True)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = 124
        output = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes)
                  else exc.stdout or "") + f"\n[timed out after {limit:.0f} s]"
    cut = rc == 124 and limit < step.timeout_s  # stopped by the budget, not by its own limit
    record.update(status="passed" if rc == 0 else "stopped" if cut else "failed", rc=rc,
                  seconds=round(time.perf_counter() - start, 1), tail=output[-4000:])
    return record


def _check(name: str, command: str, ok: bool, detail: str) -> dict:
    return {"name": name, "command": command, "status": "passed" if ok else "failed",
            "rc": 0 if ok else 1, "seconds": 0.0, "tail": detail}


def _rerank_check(out: Path, rehearsal: bool) -> dict | None:
    """The MSMT17-sized re-ranking against its target (<= 1.5x the FLOP floor): ``missed``
    when slower (a target, not a correctness failure); in a rehearsal only that the figures
    were written (a CPU at a small size says nothing about the GPU's ratio)."""
    path = out / MSMT17_JSON
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    keys = ("seconds", "gemm_gflops", "floor_s", "ratio_to_floor")
    if not all(isinstance(r.get(k), (int, float)) for k in keys):
        return _check("msmt17 re-ranking figures", f"read {path}", False, f"missing: {r}")
    detail = (f"{r['Q']:,} x {r['G']:,} on {r.get('device')}: {r['seconds']:.3f} s; GEMM "
              f"{r['gemm_gflops'] / 1e3:.1f} TFLOP/s -> floor {r['floor_s']:.3f} s; "
              f"{r['ratio_to_floor']:.2f}x the floor (target <= {r['target_ratio']}x)")
    if rehearsal:
        return _check("msmt17 re-ranking figures", f"read {path}", True, detail)
    record = _check("msmt17 re-ranking <= 1.5x floor", f"read {path}", True, detail)
    if r["ratio_to_floor"] > r["target_ratio"]:
        record.update(status="missed", rc=0)
    return record


def _extra_checks(out: Path, records: list[dict], rehearsal: bool = False) -> None:
    """Cross-step checks: the CUDA and CPU evaluations agree (rank-1 and mAP within 1e-3); the
    two DDP processes trained with a metric term > 0 and wrote one run; the MSMT17-sized
    re-ranking's ratio to its FLOP floor (:func:`_rerank_check`)."""
    a, b = out / "eval_cuda.json", out / "eval_cpu.json"
    if a.is_file() and b.is_file():
        ma, mb = (json.loads(p.read_text()).get("metrics", {}) for p in (a, b))
        keys = [k for k in ("rank1", "mAP") if ma.get(k) is not None and mb.get(k) is not None]
        same = len(keys) == 2 and all(abs(float(ma[k]) - float(mb[k])) < 1e-3 for k in keys)
        records.append(_check("evaluate cuda == cpu", f"compare {a} {b}", same,
                              f"cuda {[ma.get(k) for k in keys]}, cpu {[mb.get(k) for k in keys]}"))
    ddp = next((r for r in records if r["name"] == "ddp two processes"
                and r["status"] == "passed"), None)
    if ddp is not None:
        terms = [float(m) for m in re.findall(r"\bmet=([0-9.eE+-]+)", ddp["tail"])]
        ok = bool(terms) and all(t > 0 for t in terms) and (out / "ddp" / "final.pt").is_file()
        records.append(_check("ddp metric term > 0", "read the ddp log and run folder", ok,
                              f"metric terms logged: {terms}"))
    rerank = _rerank_check(out, rehearsal)
    if rerank is not None:
        records.append(rerank)


def _write(out: Path, records: list[dict], device: str) -> tuple[Path, Path]:
    summary = {"device": device, "passed": all(r["status"] != "failed" for r in records),
               "steps": records}
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# GPU check on {device}", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']} |" for r in records]
    left = [r for r in records if r["status"] in ("skipped", "stopped")]
    if left:
        lines += ["", "Not run to the end: " + "; ".join(
            f"{r['name']} ({r['tail'].strip().splitlines()[-1] if r['tail'].strip() else r['status']})"
            for r in left)]
    missed = [r for r in records if r["status"] == "missed"]
    if missed:
        lines += ["", "Targets missed: " + "; ".join(f"{r['name']} ({r['tail']})" for r in missed)]
    failed = [r for r in records if r["status"] == "failed"]
    for r in failed:
        lines += ["", f"## {r['name']} (exit {r['rc']})", "", "```", r["tail"][-2000:], "```"]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edaan_fast.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check", help="folder for the summary and the runs")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all steps")
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[1]),
                   help="the source tree holding tests/ and benchmarks/")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="run the steps that need no GPU on the CPU (tiny preset)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ._cli import one_line

    import torch

    source, out = Path(args.source), Path(args.out).resolve()
    steps = plan(out, rehearsal=args.cpu_rehearsal)
    gpu = torch.cuda.is_available() or args.cpu_rehearsal
    if args.dry_run or not gpu:
        why = "dry run" if args.dry_run else "no visible CUDA device"
        print(f"gpu_check ({why}): would run from {source}, writing {out}:")
        for s in steps:
            env = " ".join(f"{k}={v}" for k, v in s.env.items())
            print(f"  [{s.name}, <= {s.timeout_s} s] {env + ' ' if env else ''}{s.command}")
        return 0
    if not (source / "tests").is_dir():
        print(f"gpu_check: error: {one_line(f'no tests/ folder in {source}; pass --source')}",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    device = "CPU rehearsal" if args.cpu_rehearsal else torch.cuda.get_device_name(0)
    deadline = time.perf_counter() + args.budget
    records = []
    for step in steps:
        records.append(_run(step, source, deadline - time.perf_counter()))
        print(f"{step.name}: {records[-1]['status']} ({records[-1]['seconds']} s)", flush=True)
        _write(out, records, device)  # what it has so far, should the machine go away
    _extra_checks(out, records, args.cpu_rehearsal)
    json_path, md_path = _write(out, records, device)
    print(f"summary: {json_path}, {md_path}")
    return 0 if all(r["status"] != "failed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
