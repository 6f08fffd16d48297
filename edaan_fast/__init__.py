"""edaan_fast: EDAAN for cross-domain person re-identification, with fused C++/CUDA ops."""

__version__ = "0.1.0"

__all__ = ["FeatureExtractor", "build_info", "has_ops"]


def __getattr__(name: str):
    """``FeatureExtractor`` is imported on first use, so ``import edaan_fast`` stays light."""
    if name == "FeatureExtractor":
        from .deploy.extractor import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def has_ops() -> bool:
    """True when the compiled fused operators are loaded and match the running torch."""
    from .ops._library import has_ops as _has_ops

    return _has_ops()


def build_info():
    """What the operator library was built against (torch, CUDA, with/without CUDA kernels)."""
    from .ops._library import build_info as _build_info

    return _build_info()
