"""One command that verifies the CUDA path on a GPU machine (no internet needed):

    python -m edaan_fast.gpu_check [--out gpu-check] [--budget 480]

It runs, each step as a subprocess with its own time limit, stopping when the budget is spent:

1. every test marked ``cuda`` with ``EDAAN_FAST_REQUIRE_CUDA=1`` (a missing kernel or an
   invisible GPU fails instead of skipping);
2. the GPU benchmarks in quick mode: mask_blend bandwidth against a copy, the metric losses
   against eager, rank evaluation from features, re-ranking;
3. one short epoch of the ``paper`` preset with ``--amp`` in float16 (GradScaler) and in
   bfloat16 (peak GPU memory recorded in the run's report), and with ``--loader dali``;
4. resume from the float16 run's checkpoint, ``evaluate`` of it on CUDA and on the CPU (the
   metrics must agree);
5. two data-parallel processes on the one GPU (gloo) -- identical weights, metric term > 0;
6. ``compute-sanitizer`` memcheck and racecheck on a small subset of the op tests, where the
   tool exists.

``--cpu-rehearsal`` runs the steps that need no GPU (3 to 5 and the cross-checks) on the CPU
with the ``tiny`` preset (the float16 run in float32), so that the commands, the files they
write and the checks that read them are proven before a GPU session spends its time on them.

It writes ``gpu_check.json`` (every step: command, exit status, seconds, output tail) and
``gpu_check.md`` (a table) into ``--out``. The tests and benchmarks are read from the source
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Step", "main", "plan"]

# The op tests the sanitizers run: small, and every kernel family is in them.
SANITIZER_TESTS = ("tests/test_mask_blend.py tests/test_metric_losses.py tests/test_rank_eval.py"
                   " -m cuda -k 'not compile and not large and not market' -q -x")
QUICK_BENCH = ("benchmarks/bench_mask_blend.py benchmarks/bench_metric_losses.py "
               "benchmarks/bench_rank_eval.py benchmarks/bench_reranking.py")


#: The steps a CPU rehearsal leaves out.
REHEARSAL_SKIPS = ("cuda tests", "gpu benchmarks", "train paper dali", "memcheck", "racecheck")


@dataclass
class Step:
    """One verification step: a shell command run from the source tree."""

    name: str
    command: str
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)
    needs: str | None = None  # an executable that must exist (else the step is skipped)


def plan(out: Path, rehearsal: bool = False) -> list[Step]:
    """The steps, in order, writing their runs under ``out``; with ``rehearsal`` the ones that
    run on a CPU, on the CPU, with the ``tiny`` preset."""
    py = sys.executable
    gpu, preset, iters = ("cpu", "tiny", 5) if rehearsal else ("cuda", "paper", 20)

    def train(name: str, extra: str) -> str:
        if rehearsal:  # float16 autocast runs through slow reference kernels on a CPU
            extra = extra.replace("--amp --amp-dtype float16", "--no-amp")
        return (f"{py} -m edaan_fast.train --preset {preset} --epochs 1 --iters-per-epoch "
                f"{iters} --eval-every 0 --checkpoint-every 1 --device {gpu} "
                f"--output-dir {out / name} --overwrite {extra}")

    evaluate = (f"{py} -m edaan_fast.evaluate --checkpoint {out / 'fp16' / 'final.pt'} "
                f"--dataset synthetic")
    steps = [
        Step("cuda tests", f"{py} -m pytest tests -m cuda -q -ra -p no:cacheprovider", 240,
             {"EDAAN_FAST_REQUIRE_CUDA": "1"}),
        Step("gpu benchmarks", f"{py} -m pytest {QUICK_BENCH} --benchmark-only -q "
             f"-o python_files='bench_*.py' --benchmark-json={out / 'benchmarks.json'}", 150,
             {"EDAAN_FAST_BENCH_QUICK": "1"}),
        Step("train paper fp16", train("fp16", "--amp --amp-dtype float16"), 90),
        Step("train paper bf16", train("bf16", "--amp --amp-dtype bfloat16"), 90),
        Step("train paper dali", train("dali", "--amp --loader dali --epochs 2"), 90),
        # resumes the run's last state (RNG, scalers, optimisers) and evaluates it again
        Step("resume fp16", train("fp16", "--amp --amp-dtype float16 "
                                  f"--resume {out / 'fp16' / 'checkpoint.pt'}").replace(
                                      " --overwrite", ""), 90),
        Step("evaluate cuda", f"{evaluate} --device {gpu} --output {out / 'eval_cuda.json'}", 60),
        Step("evaluate cpu", f"{evaluate} --device cpu --output {out / 'eval_cpu.json'}", 120),
        Step("ddp two processes", f"{py} -m torch.distributed.run --nproc_per_node 2 -m "
             f"edaan_fast.train --preset {preset} --epochs 1 --iters-per-epoch 5 --eval-every 0 "
             f"--device {gpu}{'' if rehearsal else ':0'} --output-dir {out / 'ddp'} --overwrite",
             120, {"EDAAN_FAST_DIST_BACKEND": "gloo"}),
        Step("memcheck", f"compute-sanitizer --tool memcheck --error-exitcode 1 {py} -m pytest "
             f"{SANITIZER_TESTS}", 120, needs="compute-sanitizer"),
        Step("racecheck", f"compute-sanitizer --tool racecheck --error-exitcode 1 {py} -m "
             f"pytest {SANITIZER_TESTS}", 120, needs="compute-sanitizer"),
    ]
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
    if limit < 5:
        record["tail"] = "time budget spent"
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
    record.update(status="passed" if rc == 0 else "failed", rc=rc,
                  seconds=round(time.perf_counter() - start, 1), tail=output[-4000:])
    return record


def _check(name: str, command: str, ok: bool, detail: str) -> dict:
    return {"name": name, "command": command, "status": "passed" if ok else "failed",
            "rc": 0 if ok else 1, "seconds": 0.0, "tail": detail}


def _extra_checks(out: Path, records: list[dict]) -> None:
    """Cross-step checks: the CUDA and CPU evaluations agree (rank-1 and mAP within 1e-3); the
    two DDP processes trained with a metric term > 0 and wrote one run."""
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


def _write(out: Path, records: list[dict], device: str) -> tuple[Path, Path]:
    summary = {"device": device, "passed": all(r["status"] != "failed" for r in records),
               "steps": records}
    json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# GPU check on {device}", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']} |" for r in records]
    failed = [r for r in records if r["status"] == "failed"]
    for r in failed:
        lines += ["", f"## {r['name']} (exit {r['rc']})", "", "```", r["tail"][-2000:], "```"]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edaan_fast.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check", help="folder for the summary and the runs")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps")
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
    _extra_checks(out, records)
    json_path, md_path = _write(out, records, device)
    print(f"summary: {json_path}, {md_path}")
    return 0 if all(r["status"] != "failed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
