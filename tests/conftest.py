"""Shared test fixtures: devices, dtypes and the one tolerance table of the op tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import edaan_fast

HAS_CUDA = torch.cuda.is_available() and (edaan_fast.build_info() or {}).get("with_cuda", False)

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# Tolerance of a fused op against the float64 reference, by the dtype the op runs in.
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

requires_ops = pytest.mark.skipif(not edaan_fast.has_ops(), reason="compiled ops not built")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and CUDA kernels")


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout (or $EDAAN_FAST_SHARED_DATA); None if absent."""
    env = os.environ.get("EDAAN_FAST_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def gen():
    """A seeded generator: fresh random inputs each test, reproducible on failure."""
    return torch.Generator().manual_seed(1234)
