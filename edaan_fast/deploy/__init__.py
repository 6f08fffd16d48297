"""edaan_fast.deploy: using a trained model -- features from user code
(``extractor``: :class:`FeatureExtractor`), translating a data set with a trained translator
(``translation``, behind ``python -m edaan_fast.translate``) and exporting the networks to
TorchScript/ONNX (``export``, behind ``python -m edaan_fast.export``); see docs/deployment.md.

The names below are imported on first use (PEP 562).
"""

from __future__ import annotations

from edaan_fast._lazy import lazy_exports

_EXPORTS = {
    "FeatureExtractor": "extractor",
    "TranslateOptions": "translation", "TranslationError": "translation",
    "load_translator": "translation", "run_translation": "translation",
    "ExportOptions": "export", "run_export": "export",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
