"""k-reciprocal re-ranking: batched torch version vs the per-probe float64 loop reference, on
the same distance blocks (500 queries x 2,000 gallery, 128-d features; quick mode: 60 x 240).

    python -m pytest benchmarks/bench_reranking.py --benchmark-only

The reference (``_reference_re_ranking``) is the classic algorithm: one Python iteration per
probe for the reciprocal sets, the query expansion and the Jaccard distance, on dense ``N x N``
arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.conftest import QUICK
from edaan_fast.engine.reranking import _reference_re_ranking, re_ranking

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_Q, NUM_G, DIM = (60, 240, 32) if QUICK else (500, 2000, 128)
GROUP = f"re_ranking {NUM_Q}x{NUM_G}"


def _blocks():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, NUM_G // 8, (NUM_Q + NUM_G,), generator=g)
    centres = torch.randn(NUM_G // 8, DIM, generator=g, dtype=torch.float64)
    f = centres[ids] + 0.8 * torch.randn(NUM_Q + NUM_G, DIM, generator=g, dtype=torch.float64)
    d = torch.cdist(f, f)
    return (
        d[:NUM_Q, NUM_Q:].contiguous(),
        d[:NUM_Q, :NUM_Q].contiguous(),
        d[NUM_Q:, NUM_Q:].contiguous(),
    )


@pytest.fixture(scope="module")
def blocks():
    return _blocks()


@pytest.fixture(scope="module")
def reference(blocks):
    return _reference_re_ranking(*(b.numpy() for b in blocks))


def _with_threads(n, fn):
    def run():
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(old)

    return run


@pytest.mark.parametrize("threads", [1, torch.get_num_threads()], ids=["1thread", "allthreads"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_batched(benchmark, measure, blocks, reference, dtype, threads):
    """Single-threaded is the like-for-like comparison with the (single-threaded) numpy loop."""
    inputs = [b.to(DEVICE, dtype) for b in blocks]
    name = f"batched {str(dtype).split('.')[-1]} {DEVICE} {threads}t"
    out = measure(
        benchmark,
        GROUP,
        name,
        _with_threads(threads, lambda: re_ranking(*inputs)),
        device=DEVICE,
        rounds=5,
    )
    atol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(out.double().cpu(), torch.from_numpy(reference), atol=atol, rtol=0)


def test_reference_loop(benchmark, measure, blocks, reference):
    arrays = [b.numpy() for b in blocks]
    out = measure(
        benchmark,
        GROUP,
        "reference loop (numpy)",
        lambda: _reference_re_ranking(*arrays),
        baseline=True,
        rounds=1,
    )
    np.testing.assert_array_equal(out, reference)
