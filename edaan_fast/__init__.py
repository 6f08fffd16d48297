"""edaan_fast: EDAAN for cross-domain person re-identification, with fused C++/CUDA ops."""

__version__ = "0.1.0"
