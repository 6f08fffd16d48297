"""mask_blend: fused vs eager ``mask*fg + (1-mask)*bg`` vs ``torch.lerp``, with ``copy_`` as the
bandwidth ceiling. Forward and forward+backward, N in {16, 64} at 256x128, float32/bfloat16.

    python -m pytest benchmarks/bench_mask_blend.py --benchmark-only -o python_files='bench_*.py'

Bandwidth counts the bytes each op must move at least: forward reads fg, bg and the mask and
writes out; the backward reads grad, fg, bg and the mask and writes the three gradients.
The ``copy`` case of a group copies a buffer of the same total traffic (read + write = the
fused case's bytes), so that both work on the same amount of memory: a copy of one image
tensor alone would stay in the last-level cache and overstate the ceiling several times.

Speed floor (``test_speed_floor``, every mode, CPU): forward+backward at N=16, fused against
eager, interleaved on one thread (benchmarks/_timing.py): at least 1.3x in float32 and 2.0x in
bfloat16 (RESULTS.md: 2.69x and 4.04x; float32, memory bound, moves most with the machine's load).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._timing import check_floor, speedup
from benchmarks.conftest import QUICK
from edaan_fast.ops import mask_blend, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [4] if QUICK else [16, 64]
DTYPES = [torch.float32, torch.bfloat16]
H, W, C = 256, 128, 3

IMPLS = {
    "fused": mask_blend,
    "eager": reference.mask_blend,
    "lerp": lambda fg, bg, m: torch.lerp(bg, fg, m),
}


def _inputs(n, dtype, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    fg = torch.randn(n, C, H, W, generator=g).to(DEVICE, dtype)
    bg = torch.randn(n, C, H, W, generator=g).to(DEVICE, dtype)
    mask = torch.rand(n, 1, H, W, generator=g).to(DEVICE, dtype)
    for t in (fg, bg, mask):
        t.requires_grad_(requires_grad)
    return fg, bg, mask


def _bytes(n, dtype, backward):
    full, plane = n * C * H * W * dtype.itemsize, n * H * W * dtype.itemsize
    fwd = 3 * full + plane
    return fwd + (5 * full + 2 * plane if backward else 0)


def _measure_copy(benchmark, measure, group, traffic, dtype):
    """``dst.copy_(src)`` with read + write = ``traffic`` bytes."""
    src = torch.rand(traffic // 2 // dtype.itemsize, device=DEVICE).to(dtype)
    dst = torch.empty_like(src)
    measure(benchmark, group, "copy", lambda: dst.copy_(src), device=DEVICE,
            bytes_moved=2 * src.numel() * dtype.itemsize)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", list(IMPLS) + ["copy"])
def test_forward(benchmark, measure, impl, n, dtype):
    fg, bg, mask = _inputs(n, dtype, False)
    group = f"forward N={n} {str(dtype).split('.')[-1]}"
    if impl == "copy":
        _measure_copy(benchmark, measure, group, _bytes(n, dtype, False), dtype)
        return
    fn = IMPLS[impl]
    out = measure(benchmark, group, impl, lambda: fn(fg, bg, mask), device=DEVICE,
                  bytes_moved=_bytes(n, dtype, False), baseline=impl == "eager")
    torch.testing.assert_close(out.float(), reference.mask_blend(fg, bg, mask).float(),
                               atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", list(IMPLS) + ["copy"])
def test_forward_backward(benchmark, measure, impl, n, dtype):
    group = f"forward+backward N={n} {str(dtype).split('.')[-1]}"
    if impl == "copy":
        _measure_copy(benchmark, measure, group, _bytes(n, dtype, True), dtype)
        return
    fg, bg, mask = _inputs(n, dtype, True)
    grad = torch.randn_like(fg)
    fn = IMPLS[impl]

    def step():
        return torch.autograd.grad(fn(fg, bg, mask), (fg, bg, mask), grad)

    grads = measure(benchmark, group, impl, step, device=DEVICE,
                    bytes_moved=_bytes(n, dtype, True), baseline=impl == "eager")
    assert grads[2].shape == mask.shape


FLOOR_N = 16
FLOORS = {torch.float32: 1.3, torch.bfloat16: 2.0}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_speed_floor(benchmark, dtype):
    if DEVICE != "cpu":
        pytest.skip("the floors are CPU measurements (benchmarks/RESULTS.md)")
    fg, bg, mask = _inputs(FLOOR_N, dtype, True)
    grad = torch.randn_like(fg)

    def step(fn):
        return lambda: torch.autograd.grad(fn(fg, bg, mask), (fg, bg, mask), grad)

    cases = {"eager": step(reference.mask_blend), "fused": step(mask_blend)}

    ratio = speedup(cases, 15, base="eager")
    benchmark.group = "speed floors"
    benchmark.pedantic(lambda: check_floor(
        f"mask_blend fwd+bwd N={FLOOR_N} {str(dtype).split('.')[-1]}: eager / fused", ratio,
        FLOORS[dtype], benchmark), rounds=1, iterations=1)
