"""One full EDAAN training step (generator step + discriminator step, eq. 9): the step the
trainer runs against the eager float32 step, in the same run.

    python -m pytest benchmarks/bench_train_step.py --benchmark-only -o python_files='bench_*.py'

Cases (``benchmarks/_step.py`` builds each step as the trainer does; the ratio table at the end
of the run takes ``eager float32`` as the baseline):

* ``reference float32``: ``use_reference_ops()`` -- eager ``mask*fg + (1-mask)*bg``, eager
  background masking and the eager batch-hard quartet loss; float32, Adam's per-parameter loop.
* ``eager float32``: the fused ops in float32, Adam's per-parameter loop, no compilation: the
  step as ``train --no-amp`` ran it before the throughput work (docs/training.md,
  "Throughput").
* ``float32``: what ``train --no-amp`` runs now (the engine's execution options).
* ``amp``: what ``python -m edaan_fast.train --amp`` runs: autocast in the dtype of
  ``resolve_precision`` (bfloat16 on a CPU with native bfloat16 and on GPUs of compute
  capability 8.0+, float16 + GradScaler on older GPUs); skipped on a CPU without native
  bfloat16, where the trainer runs ``--amp`` in float32.
* ``amp + compile``: ``train --amp --compile`` (the compilation is the untimed warm-up); on a
  CPU only with ``EDAAN_FAST_BENCH_COMPILE=1``: inductor compiles for minutes there and the
  compiled step measured slower (RESULTS.md, "Training step throughput").

``test_speedup_floor`` times ``eager float32`` and ``amp`` interleaved, step by step, on one
thread (``benchmarks/_timing.py``) and checks a floor of 1.2x (measured: RESULTS.md, "Training
step throughput").

Workload: the ``tiny`` preset (64 x 32 images) on CPU, the ``paper`` preset (256 x 128) on a
GPU (``EDAAN_FAST_BENCH_PRESET=paper|tiny`` chooses; the ``paper`` preset on a CPU times 5
rounds); a PK batch of 16 source images (4 identities x 4) and 16 target images; the phase of
the first epochs (attention trained, discriminators on whole images). ``images/s`` counts the
32 images of a step. EDAAN_FAST_BENCH_QUICK=1 runs a batch of 8 with few rounds.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from benchmarks._step import make_step
from benchmarks._timing import check_floor, interleaved, median_seconds, one_thread
from edaan_fast.engine.execution import ExecutionOptions
from edaan_fast.engine.precision import cpu_has_native_bf16, resolve_precision
from edaan_fast.ops._library import use_reference_ops

QUICK = os.environ.get("EDAAN_FAST_BENCH_QUICK", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRESET = os.environ.get("EDAAN_FAST_BENCH_PRESET") or ("paper" if DEVICE == "cuda" else "tiny")
ROUNDS = 5 if PRESET == "paper" and DEVICE == "cpu" else 30
BATCH = 8 if QUICK else 16
AMP = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
    resolve_precision(True, "auto", DEVICE)]
EAGER = ExecutionOptions(fused_optimizer=False)

#: case -> (precision, execution options, with the reference ops)
CASES = {
    "reference float32": ("fp32", EAGER, True),
    "eager float32": ("fp32", EAGER, False),
    "float32": ("fp32", ExecutionOptions(), False),
    "amp": (AMP, ExecutionOptions(), False),
    "amp + compile": (AMP, ExecutionOptions(compile=True), False),
}
FLOOR = 1.2  # amp against eager float32, tiny preset on the CPU (measured 1.45x)
COMPILE_ON_CPU = os.environ.get("EDAAN_FAST_BENCH_COMPILE", "0") == "1"


def _no_native_amp() -> bool:
    return DEVICE == "cpu" and not cpu_has_native_bf16()


@pytest.mark.parametrize("case", list(CASES))
def test_train_step(benchmark, measure, case):
    if case == "amp + compile" and DEVICE == "cpu" and not COMPILE_ON_CPU:
        pytest.skip("inductor compiles for minutes on a CPU; EDAAN_FAST_BENCH_COMPILE=1")
    if case.startswith("amp") and _no_native_amp():
        pytest.skip("no native bfloat16 on this CPU: the trainer runs --amp in float32 here "
                    "(the 'float32' case)")
    precision, options, reference = CASES[case]
    run = make_step(PRESET, BATCH, DEVICE, precision, options).run
    ops = use_reference_ops() if reference else contextlib.nullcontext()
    with ops:
        result = measure(benchmark, f"train step ({PRESET}, B={BATCH}+{BATCH})", case, run,
                         device=DEVICE, baseline=case == "eager float32",
                         rounds=None if QUICK else ROUNDS)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.values()), result
    median = median_seconds(benchmark)
    if median is not None:
        benchmark.extra_info["images/s"] = round(2 * BATCH / median, 1)


@pytest.mark.skipif(DEVICE != "cpu" or PRESET != "tiny", reason="the floor is the CPU's")
def test_speedup_floor(benchmark):
    if _no_native_amp():
        pytest.skip("no native bfloat16 on this CPU: --amp trains in float32 here")
    cases = {"base": make_step(PRESET, BATCH, DEVICE, "fp32", EAGER).run,
             "fused": make_step(PRESET, BATCH, DEVICE, AMP, ExecutionOptions()).run}

    def measure() -> float:
        with one_thread():
            med = interleaved(cases, 3 if QUICK else 10)
        return med["base"] / med["fused"]

    benchmark.pedantic(lambda: check_floor(f"train step {PRESET}: eager float32 / amp", measure,
                                           FLOOR, benchmark), rounds=1, iterations=1)
