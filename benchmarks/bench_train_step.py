"""One full EDAAN training step (generator step + discriminator step, eq. 9): images/s with the
fused ops under AMP against the pure-PyTorch reference ops in float32, in the same run.

    python -m pytest benchmarks/bench_train_step.py --benchmark-only -o python_files='bench_*.py'

Cases (the ratio table at the end of the run takes ``reference float32`` as the baseline):

* ``reference float32``: ``use_reference_ops()`` -- eager ``mask*fg + (1-mask)*bg``, eager
  background masking and the eager batch-hard quartet loss; no autocast.
* ``fused float32``: the fused ops, no autocast (what the ops alone bring).
* ``fused amp``: the fused ops under autocast (the dtype of ``resolve_precision``: bfloat16 on
  CPU and on GPUs of compute capability 8.0+, float16 + GradScaler on older GPUs),
  what ``python -m edaan_fast.train --amp`` runs; skipped on a CPU without native bfloat16
  (AVX512-BF16/AMX), where the trainer runs ``--amp`` in float32.

Workload: the ``tiny`` preset (64 x 32 images) on CPU, the ``paper`` preset (256 x 128) on a
GPU (``EDAAN_FAST_BENCH_PRESET=paper|tiny`` chooses; the ``paper`` preset on a CPU times 5
rounds); a PK batch of 16 source images (4 identities x 4) and 16 target images; the phase of the
first epochs (attention trained, discriminators on whole images). ``images/s`` counts the 32
images of a step. EDAAN_FAST_BENCH_QUICK=1 runs a batch of 8 with few rounds.
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks._timing import median_seconds
from edaan_fast.engine.precision import cpu_has_native_bf16
from edaan_fast.engine.steps import EDAANTrainStep, Phase
from edaan_fast.losses import EDAANObjective, QuartetLoss
from edaan_fast.models import build_model
from edaan_fast.ops._library import use_reference_ops

QUICK = os.environ.get("EDAAN_FAST_BENCH_QUICK", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRESET = os.environ.get("EDAAN_FAST_BENCH_PRESET") or ("paper" if DEVICE == "cuda" else "tiny")
ROUNDS = 5 if PRESET == "paper" and DEVICE == "cpu" else 30
BATCH = 8 if QUICK else 16
K = 4  # images per identity


def _setup(amp: bool):
    torch.manual_seed(0)
    model = build_model(PRESET, num_ids=BATCH // K).to(DEVICE).train()
    step = EDAANTrainStep(model, EDAANObjective(QuartetLoss()), amp=amp, pool_size=50)
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(model.discriminator_parameters(), lr=2e-4, betas=(0.5, 0.999))
    h, w = model.config.image_size
    g = torch.Generator().manual_seed(0)
    x_s = torch.rand(BATCH, 3, h, w, generator=g).to(DEVICE) * 2 - 1
    x_t = torch.rand(BATCH, 3, h, w, generator=g).to(DEVICE) * 2 - 1
    labels = (torch.arange(BATCH) // K).to(DEVICE)
    return lambda: step(x_s, labels, x_t, opt_g, opt_d, Phase(True, False))


@pytest.mark.parametrize("case", ["reference float32", "fused float32", "fused amp"])
def test_train_step(benchmark, measure, case):
    if case == "fused amp" and DEVICE == "cpu" and not cpu_has_native_bf16():
        pytest.skip("no native bfloat16 on this CPU: autocast would run the convolutions "
                    "through slow reference kernels, so the trainer runs --amp in float32 "
                    "here (the 'fused float32' case)")
    run = _setup(amp=case == "fused amp")
    if case.startswith("reference"):
        with use_reference_ops():
            result = measure(benchmark, f"train step ({PRESET}, B={BATCH}+{BATCH})", case, run,
                             device=DEVICE, baseline=True, rounds=None if QUICK else ROUNDS)
    else:
        result = measure(benchmark, f"train step ({PRESET}, B={BATCH}+{BATCH})", case, run,
                         device=DEVICE, rounds=None if QUICK else ROUNDS)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.values()), result
    median = median_seconds(benchmark)
    if median is not None:
        benchmark.extra_info["images/s"] = round(2 * BATCH / median, 1)
