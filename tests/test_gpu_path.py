"""The CUDA path's host-side rules, checked where a CPU can run them: the one precision
resolver, the RNG state a resume restores on the run's device only, the per-loader and per-rank
seeds, the GPU check's plan, and EDAAN_FAST_REQUIRE_CUDA."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edaan_fast.engine import distributed, precision
from edaan_fast.engine.distributed import LOADER_STREAMS, derive_seed, rng_state, set_rng_state
from edaan_fast.engine.precision import resolve_precision

from tests.conftest import HAS_CUDA

ROOT = Path(__file__).resolve().parents[1]


# --- precision: one resolver ------------------------------------------------------------------


@pytest.mark.parametrize("capability, want", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                              ((9, 0), torch.bfloat16), ((12, 0), torch.bfloat16)])
def test_cuda_auto_precision_is_bf16_only_from_capability_8(monkeypatch, capability, want):
    # Turing (7.5) emulates bfloat16: is_bf16_supported() says True there, the resolver not
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda index=None: capability if index in (None, 0, 1) else None)
    assert resolve_precision(True, "auto", "cuda") == want
    assert resolve_precision(True, None, torch.device("cuda", 1)) == want
    assert resolve_precision(True, "float16", "cuda") == torch.float16  # forced: as given
    assert resolve_precision(False, "auto", "cuda") is None


def test_cpu_precision_is_unchanged():
    assert resolve_precision(True, "auto", "cpu") == torch.bfloat16
    assert resolve_precision(True, "auto", torch.device("cpu")) == torch.bfloat16
    fallback = resolve_precision(True, "auto", "cpu", cpu_fallback=True)
    assert fallback == (torch.bfloat16 if precision.cpu_has_native_bf16() else None)
    with pytest.raises(ValueError, match="amp_dtype must be torch.float16 or torch.bfloat16"):
        resolve_precision(True, "float32", "cpu")


def test_every_autocast_site_asks_the_resolver():
    """The trainer, the steps (and so the train-step benchmark) and feature extraction take
    their dtype from engine.precision; no module picks one on its own."""
    package = ROOT / "edaan_fast"
    for name in ("engine/trainer.py", "engine/steps.py", "evaluation/evaluator.py"):
        text = (package / name).read_text()
        assert "resolve_precision" in text, name
        assert "torch.float16 if" not in text and "is_bf16_supported" not in text, name
    assert not hasattr(__import__("edaan_fast.engine.steps", fromlist=["x"]), "resolve_amp_dtype")


# --- resume: the run device's CUDA generator only -------------------------------------------


def test_rng_state_of_a_cpu_run_has_no_cuda_state_and_restores():
    state = rng_state(torch.device("cpu"))
    assert state["cuda"] is None
    want = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state, torch.device("cpu"))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


@pytest.mark.parametrize("saved, device, want", [
    ("one", torch.device("cuda", 1), "s"),             # current format: one state
    ("list4", torch.device("cuda", 2), "s2"),          # old format: every visible GPU's
    ("list4", torch.device("cuda", 0), "s0"),
    ("list1", torch.device("cuda", 3), "s0"),          # saved with fewer GPUs visible
    ("empty", torch.device("cuda", 0), None),          # saved by a CPU run
])
def test_resume_restores_the_run_devices_cuda_state_only(monkeypatch, saved, device, want):
    states = {f"s{i}": torch.full((8,), i, dtype=torch.uint8) for i in range(4)}
    states["s"] = torch.full((8,), 9, dtype=torch.uint8)
    cuda = {"one": states["s"], "list4": [states[f"s{i}"] for i in range(4)],
            "list1": [states["s0"]], "empty": []}[saved]
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, d: calls.append((s, d)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda s: pytest.fail("restores every GPU: fails with fewer visible"))
    state = {**rng_state(torch.device("cpu")), "cuda": cuda}
    set_rng_state(state, device)
    if want is None:
        assert calls == []
    else:
        assert len(calls) == 1 and torch.equal(calls[0][0], states[want]) and calls[0][1] == device


# --- seeds: one stream per loader and per rank ----------------------------------------------


def test_loader_and_rank_seeds_differ_and_rank_zero_keeps_the_run_seed():
    seed = 1
    assert derive_seed(seed, 0) == seed  # a one-process run draws what it always drew
    streams = {(rank, name): derive_seed(seed, rank, salt)
               for rank in range(4) for name, salt in LOADER_STREAMS.items()}
    process = {rank: derive_seed(seed, rank) for rank in range(4)}
    values = list(streams.values()) + list(process.values())
    assert len(set(values)) == len(values)  # source != target, rank r != rank s
    assert all(0 <= v < 2 ** 31 for v in values)
    assert derive_seed(2, 1, 1) != derive_seed(1, 1, 1)
    assert derive_seed(1, 1, 1) == streams[(1, "source")]  # reproducible


def test_source_and_target_loaders_augment_differently(tmp_path):
    """With workers, the source and the target loader used to share a seed, so image i of
    each got the same flip and crop; now their worker streams differ."""
    from edaan_fast.engine.run_config import RunConfig
    from edaan_fast.engine.trainer import Trainer

    from .test_trainer import MICRO

    run = RunConfig(**{**MICRO, "num_workers": 1, "device": "cpu"},
                    output_dir=str(tmp_path / "run"))
    trainer = Trainer(run)
    seeds = [loader._loader.generator.initial_seed()
             for loader in (trainer.source_loader, trainer.target_loader)]
    assert seeds[0] != seeds[1]
    assert seeds == [derive_seed(run.seed, 0, 1), derive_seed(run.seed, 0, 2)]


# --- the GPU check and EDAAN_FAST_REQUIRE_CUDA ----------------------------------------------


def _python(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                               **(env or {})}, timeout=timeout)


def test_gpu_check_prints_its_plan_and_exits_0_without_a_gpu(tmp_path):
    from edaan_fast import gpu_check

    steps = gpu_check.plan(tmp_path)
    names = [s.name for s in steps]
    for wanted in ("cuda tests", "gpu benchmarks", "train paper fp16", "train paper bf16",
                   "train paper dali", "resume fp16", "evaluate cuda", "evaluate cpu",
                   "ddp two processes", "memcheck", "racecheck", "msmt17 re-ranking"):
        assert wanted in names
    # the MSMT17-sized re-ranking runs on the GPU after the correctness steps
    rerank = steps[names.index("msmt17 re-ranking")]
    assert names.index("msmt17 re-ranking") > names.index("evaluate cpu")
    assert "--msmt17 --device cuda --json" in rerank.command and "--shape" not in rerank.command
    assert steps[0].env == {"EDAAN_FAST_REQUIRE_CUDA": "1"} and "-m cuda" in steps[0].command
    # the plan is longer than a short loan; what matters most comes first and fits the default
    # budget: correctness of every op on the GPU, then one paper-preset step in each precision
    first = names.index("train paper bf16") + 1
    assert names[:first] == ["cuda tests", "train paper fp16", "train paper bf16"]
    assert sum(s.timeout_s for s in steps[:first]) <= gpu_check.DEFAULT_BUDGET_S
    assert max(s.timeout_s for s in steps) <= 300  # no one step takes a loan's whole command
    proc = _python("-m", "edaan_fast.gpu_check", "--dry-run", "--out", str(tmp_path / "g"))
    assert proc.returncode == 0, proc.stderr
    assert "would run" in proc.stdout and "compute-sanitizer --tool racecheck" in proc.stdout
    assert not (tmp_path / "g").exists()  # a plan writes nothing
    if not torch.cuda.is_available():
        plain = _python("-m", "edaan_fast.gpu_check", "--out", str(tmp_path / "g"))
        assert plain.returncode == 0 and "no visible CUDA device" in plain.stdout


def test_gpu_check_cpu_rehearsal_runs_its_commands_and_cross_checks(tmp_path):
    """The GPU check's train / resume / evaluate / DDP commands and the checks that read their
    files, proven on the CPU (tiny preset) before a GPU session spends time on them."""
    out = tmp_path / "rehearsal"
    proc = _python("-m", "edaan_fast.gpu_check", "--cpu-rehearsal", "--out", str(out),
                   "--budget", "900", timeout=1000)
    summary = json.loads((out / "gpu_check.json").read_text())
    status = {r["name"]: r["status"] for r in summary["steps"]}
    assert proc.returncode == 0, (status, proc.stdout[-2000:])
    assert set(status) == {"train paper fp16", "train paper bf16", "resume fp16",
                           "evaluate cuda", "evaluate cpu", "ddp two processes",
                           "evaluate cuda == cpu", "ddp metric term > 0", "msmt17 re-ranking",
                           "msmt17 re-ranking figures"}
    assert set(status.values()) == {"passed"}
    assert "resumed" in next(r["tail"] for r in summary["steps"] if r["name"] == "resume fp16")


def test_gpu_check_judges_the_msmt17_reranking_against_its_floor(tmp_path):
    """<= 1.5x the FLOP floor passes, slower is 'missed' (a speed target: the check as a whole
    still passes), unreadable figures fail; a rehearsal only checks that they were written."""
    from edaan_fast import gpu_check

    def figures(ratio, **extra):
        r = {"Q": 11_659, "G": 82_161, "device": "Test GPU", "seconds": 0.09 * ratio,
             "gemm_gflops": 50_000.0, "floor_s": 0.045, "ratio_to_floor": 2 * ratio,
             "target_ratio": 1.5, **extra}
        (tmp_path / gpu_check.MSMT17_JSON).write_text(json.dumps(r))

    assert gpu_check._rerank_check(tmp_path, False) is None  # the step did not run
    figures(0.6)
    ok = gpu_check._rerank_check(tmp_path, False)
    assert ok["status"] == "passed" and "1.20x the floor" in ok["tail"], ok
    assert "50.0 TFLOP/s" in ok["tail"]
    figures(0.9)
    slow = gpu_check._rerank_check(tmp_path, False)
    assert slow["status"] == "missed" and "1.80x" in slow["tail"]
    json_path, md_path = gpu_check._write(tmp_path, [slow], "Test GPU")
    assert json.loads(json_path.read_text())["passed"]
    assert "Targets missed: msmt17 re-ranking <= 1.5x floor" in md_path.read_text()
    assert gpu_check._rerank_check(tmp_path, True)["status"] == "passed"  # rehearsal: written
    figures(0.9, seconds=None)
    assert gpu_check._rerank_check(tmp_path, True)["status"] == "failed"


def test_gpu_check_runs_by_priority_and_stops_cleanly_at_the_budget(tmp_path, monkeypatch):
    """A step is one registration line; the plan orders by priority; a step that the budget
    would cut off is not started, one cut off anyway is "stopped" (not failed), and the
    summary, written after every step, says what was left out."""
    from edaan_fast import gpu_check

    monkeypatch.setattr(gpu_check, "_REGISTRY", [])
    gpu_check.register(30, lambda c: gpu_check.Step("long", "sleep 30", 60))
    gpu_check.register(10, lambda c: gpu_check.Step("quick", f"{c.py} -c 'print(1)'", 20))
    gpu_check.register(20, lambda c: gpu_check.Step("cut", "sleep 30", 12))
    assert [s.name for s in gpu_check.plan(tmp_path)] == ["quick", "cut", "long"]
    rc = gpu_check.main(["--cpu-rehearsal", "--out", str(tmp_path / "g"), "--budget", "8"])
    summary = json.loads((tmp_path / "g" / "gpu_check.json").read_text())
    status = {r["name"]: r["status"] for r in summary["steps"]}
    assert status == {"quick": "passed", "cut": "stopped", "long": "skipped"}, summary
    assert rc == 0 and summary["passed"] is True
    md = (tmp_path / "g" / "gpu_check.md").read_text()
    assert "Not run to the end: cut" in md and "long (time budget spent" in md
    seconds = {r["name"]: r["seconds"] for r in summary["steps"]}
    assert seconds["cut"] < 10  # cut at the budget, not at its own 12 s


def test_gpu_check_summaries(tmp_path):
    from edaan_fast import gpu_check

    records = [{"name": "cuda tests", "status": "passed", "rc": 0, "seconds": 3.0, "tail": ""},
               {"name": "memcheck", "status": "failed", "rc": 1, "seconds": 9.5,
                "tail": "========= Invalid __global__ read"}]
    json_path, md_path = gpu_check._write(tmp_path, records, "Test GPU")
    summary = json.loads(json_path.read_text())
    assert summary["passed"] is False and summary["device"] == "Test GPU"
    md = md_path.read_text()
    assert "| memcheck | failed | 9.5 |" in md and "Invalid __global__ read" in md


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour where CUDA is missing")
def test_require_cuda_turns_cuda_skips_into_failures():
    test = "tests/test_metric_losses.py::test_errors_device_mismatch"
    skipped = _python("-m", "pytest", test, "-q", "-p", "no:cacheprovider")
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout
    failed = _python("-m", "pytest", test, "-q", "-p", "no:cacheprovider",
                     env={"EDAAN_FAST_REQUIRE_CUDA": "1"})
    assert failed.returncode == 1 and "EDAAN_FAST_REQUIRE_CUDA=1 but" in failed.stdout



def test_collectives_outwait_rank_zeros_evaluation():
    assert distributed.COLLECTIVE_TIMEOUT.total_seconds() > 600  # NCCL's 10-minute default


@pytest.mark.parametrize("arch, capability, runs", [
    ("8.0;9.0", (8, 6), True), ("8.0;9.0", (7, 5), False), ("8.0;9.0", (10, 0), False),
    ("8.0;9.0+PTX", (10, 0), True), ("8.0;9.0+PTX", (12, 0), True), ("7.5;8.0", (7, 5), True),
    ("9.0+PTX", (8, 9), False)])
def test_load_check_names_a_gpu_without_kernels(arch, capability, runs):
    from edaan_fast.ops._library import _arch_serves

    assert _arch_serves(arch, capability) is runs
