"""edaan_fast.evaluation: the evaluation job over :mod:`edaan_fast.metrics` -- features of a
model (``evaluator``), the one evaluation plan per data set (``targets``), the job behind
``python -m edaan_fast.evaluate`` (``job``), its figures (``figures``) and the run report
(``report``). How good the numbers are is computed in :mod:`edaan_fast.metrics`; see
docs/architecture.md.

The names below are imported on first use (PEP 562).
"""

from __future__ import annotations

from edaan_fast._lazy import lazy_exports

_EXPORTS = {
    # features of a model and what they score
    "attention_probe": "evaluator", "evaluate_attention": "evaluator",
    "evaluate_model": "evaluator", "extract_features": "evaluator",
    "extract_split_features": "evaluator", "model_features": "evaluator",
    # one plan per data set
    "DATASETS": "targets", "Plan": "targets", "evaluate_target": "targets",
    "plan_target": "targets",
    # python -m edaan_fast.evaluate
    "EvaluateOptions": "job", "run_evaluation": "job",
    # the run report
    "VARIANT_NAMES": "report", "build_report": "report", "method_name": "report",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
