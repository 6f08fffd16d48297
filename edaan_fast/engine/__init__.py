"""edaan_fast.engine: everything that runs a model -- the typed run configuration
(``run_config``), the training steps (``steps``), the stages of a variant (``stages``), the
trainer's loop (``trainer``) and its hooks (``hooks``), processes (``distributed``), precision
(``precision``), checkpoints and output folders (``checkpoint``, ``run_dir``), feature
extraction (``evaluator``), the one evaluation plan (``targets``), the evaluation job and its
figures (``evaluation``, ``figures``) and the run report (``report``). How good the numbers
are is measured in :mod:`edaan_fast.metrics`; see docs/architecture.md.

The names below are imported on first use (PEP 562), so importing one engine module (say
``edaan_fast.engine.checkpoint`` or ``.evaluator`` for exported features) does not pull in the
data pipeline, torchvision or the trainer.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # one training iteration (generator + discriminator updates, AMP, image pools)
    "EDAANTrainStep": "steps", "NonFiniteLossError": "steps", "Phase": "steps",
    "ReIDStep": "steps", "resolve_precision": "precision",
    "ImagePool": "image_pool",
    # the training job (python -m edaan_fast.train)
    "RunConfig": "run_config", "RunConfigError": "run_config", "source_dataset": "run_config",
    "target_dataset": "run_config", "HookBase": "hooks", "Trainer": "trainer",
    "TrainingInterrupted": "trainer", "train": "trainer",
    # checkpoints
    "CheckpointError": "checkpoint", "load_checkpoint": "checkpoint",
    "model_from_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    # evaluation (python -m edaan_fast.evaluate)
    "FeatureMismatchError": "evaluator", "Features": "evaluator", "ReRanking": "evaluator",
    "distance_matrix": "evaluator", "evaluate_features": "evaluator",
    "evaluate_model": "evaluator", "evaluate_prid2011": "evaluator",
    "extract_features": "evaluator", "extract_split_features": "evaluator",
    "EvaluateOptions": "evaluation", "run_evaluation": "evaluation",
    "Plan": "targets", "evaluate_target": "targets",
    # features of a trained model from user code
    "FeatureExtractor": "extractor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
