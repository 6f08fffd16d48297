"""One EDAAN training step on synthetic inputs, built the way the trainer builds it, for the
benchmarks that time it (``bench_train_step.py``, ``profile_train_step.py``,
``gpu_throughput.py``).

The model, the optimisers (:func:`~edaan_fast.engine.stages.build_optimizers` with the default
run's settings: Adam, the attention nets' own learning-rate group) and the execution options
(:func:`~edaan_fast.engine.execution.prepare_model`: memory format, ``torch.compile``) come
from the engine, so a benchmark times what ``python -m edaan_fast.train`` runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from edaan_fast.engine.execution import ExecutionOptions, prepare_model, to_layout
from edaan_fast.engine.run_config import RunConfig
from edaan_fast.engine.stages import Stage, build_optimizers
from edaan_fast.engine.steps import EDAANTrainStep, Phase
from edaan_fast.losses import EDAANObjective, QuartetLoss
from edaan_fast.models import EDAAN, build_model

K = 4  # images per identity of a PK batch

#: ``--precision`` names -> autocast dtype (None: float32).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepSetup:
    """A ready training step: ``run()`` does one generator + discriminator iteration on the
    fixed batch, ``run_on(x_s, labels, x_t)`` one on the given batch."""

    model: EDAAN
    step: EDAANTrainStep
    run: Callable[[], dict[str, float]]
    run_on: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, float]]
    images_per_step: int


def make_step(preset: str = "tiny", batch: int = 16, device: str = "cpu",
              precision: str = "fp32", options: ExecutionOptions | None = None,
              seed: int = 0, num_ids: int | None = None) -> StepSetup:
    """A training step of ``preset`` on ``batch`` source (PK: ``batch / 4`` identities x 4) and
    ``batch`` target images, first phase (attention learning, whole-image discriminators);
    ``num_ids`` classes (default: the batch's identities; a loader's data set: its own)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if batch < 2 * K or batch % K:
        raise ValueError(f"batch must be a multiple of {K} and >= {2 * K}, got {batch}")
    options = options or ExecutionOptions()
    torch.manual_seed(seed)
    model = build_model(preset, num_ids=num_ids or batch // K).to(device).train()
    prepare_model(model, options)
    dtype = PRECISIONS[precision]
    step = EDAANTrainStep(model, EDAANObjective(QuartetLoss()), amp=dtype is not None,
                          amp_dtype=dtype, pool_size=50)
    optimizers, _ = build_optimizers(Stage("joint", 1), model, RunConfig(),
                                     fused=options.fused_optimizer)
    h, w = model.config.image_size
    g = torch.Generator().manual_seed(seed)
    x_s = to_layout(torch.rand(batch, 3, h, w, generator=g).to(device) * 2 - 1, options)
    x_t = to_layout(torch.rand(batch, 3, h, w, generator=g).to(device) * 2 - 1, options)
    labels = (torch.arange(batch) // K).to(device)
    phase = Phase(True, False)

    def run_on(xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor) -> dict[str, float]:
        return step(xs, ys, xt, optimizers["G"], optimizers["D"], phase)

    return StepSetup(model, step, lambda: run_on(x_s, labels, x_t), run_on, 2 * batch)
