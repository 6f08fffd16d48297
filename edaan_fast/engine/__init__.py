"""edaan_fast.engine: the training loop -- the typed run configuration (``run_config``), the
training steps (``steps``), the stages of a variant (``stages``), the trainer's loop
(``trainer``) and its hooks (``hooks``), processes (``distributed``), precision and devices
(``precision``), checkpoints and output folders (``checkpoint``, ``run_dir``) and the image
pools (``image_pool``). Evaluating a model is :mod:`edaan_fast.evaluation`'s job, using a
trained one :mod:`edaan_fast.deploy`'s; see docs/architecture.md.

The names below are imported on first use (PEP 562), so importing one engine module (say
``edaan_fast.engine.checkpoint``) does not pull in the data pipeline, torchvision or the
trainer.
"""

from __future__ import annotations

from edaan_fast._lazy import lazy_exports

_EXPORTS = {
    # one training iteration (generator + discriminator updates, AMP, image pools)
    "EDAANTrainStep": "steps", "NonFiniteLossError": "steps", "Phase": "steps",
    "ReIDStep": "steps", "ImagePool": "image_pool",
    "resolve_precision": "precision", "device_of": "precision",
    # the training job (python -m edaan_fast.train)
    "RunConfig": "run_config", "RunConfigError": "run_config", "source_dataset": "run_config",
    "target_dataset": "run_config", "resume_config": "run_config", "HookBase": "hooks",
    "TrainingInterrupted": "hooks", "Trainer": "trainer", "train": "trainer",
    # checkpoints
    "CheckpointError": "checkpoint", "load_checkpoint": "checkpoint",
    "model_from_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
