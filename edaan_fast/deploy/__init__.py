"""edaan_fast.deploy: using a trained model -- features from user code
(``extractor``: :class:`FeatureExtractor`), translating a data set with a trained translator
(``translation``, behind ``python -m edaan_fast.translate``) and exporting the networks to
TorchScript/ONNX (``export``, behind ``python -m edaan_fast.export``); see docs/deployment.md.

The names below are imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FeatureExtractor": "extractor",
    "TranslateOptions": "translation", "TranslationError": "translation",
    "load_translator": "translation", "run_translation": "translation",
    "ExportOptions": "export", "run_export": "export",
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
