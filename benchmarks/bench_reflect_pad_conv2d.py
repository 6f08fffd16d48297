"""reflect_pad_conv2d: the fused 7x7 output layer against ``F.pad(mode="reflect")`` +
``F.conv2d`` (oneDNN), forward+backward, on the tiny preset's output layers.

    python -m pytest benchmarks/bench_reflect_pad_conv2d.py --benchmark-only -o python_files='bench_*.py'

Shapes: x ``[16, 16, 64, 32]`` (the tiny preset's last generator / attention features, a
``[16, 16, 70, 38]`` padded input for oneDNN) to C_out = 3 (the generator's image) and 1 (the
attention map), 7x7, float32 and bfloat16, NCHW and channels_last. The eager case is exactly
what the models ran before (``ReflectionPad2d`` then ``Conv2d``).

Speed floor (``test_speed_floor``, every mode, CPU): forward+backward at C_out = 3, NCHW, fused
against eager, interleaved on one thread (benchmarks/_timing.py): at least 1.4x in float32 and
1.0x in bfloat16 (RESULTS.md, "Narrow 7x7 output convolutions": 2.79x and 1.54x measured).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._timing import check_floor, speedup
from benchmarks.conftest import QUICK
from edaan_fast.ops import reference, reflect_pad_conv2d

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N = 4 if QUICK else 16
C, H, W, K = 16, 64, 32, 7
OUT_CHANNELS = [3, 1]
DTYPES = [torch.float32, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]

IMPLS = {"fused": reflect_pad_conv2d, "eager": reference.reflect_pad_conv2d}


def _inputs(n, co, dtype, layout):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, C, H, W, generator=g).to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(co, C, K, K, generator=g) * 0.02).to(DEVICE, dtype)
    bias = torch.zeros(co).to(DEVICE, dtype)
    grad = torch.randn(n, co, H, W, generator=g).to(DEVICE, dtype)
    for t in (x, weight, bias):
        t.requires_grad_()
    return x, weight, bias, grad


def _step(fn, x, weight, bias, grad):
    return lambda: torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), grad)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("co", OUT_CHANNELS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward_backward(benchmark, measure, impl, co, dtype, layout):
    x, weight, bias, grad = _inputs(N, co, dtype, layout)
    group = f"7x7 fwd+bwd N={N} C_out={co} {str(dtype).split('.')[-1]} {layout}"
    grads = measure(benchmark, group, impl, _step(IMPLS[impl], x, weight, bias, grad),
                    device=DEVICE, baseline=impl == "eager")
    ref = _step(reference.reflect_pad_conv2d, x, weight, bias, grad)()
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


FLOORS = {torch.float32: 1.4, torch.bfloat16: 1.0}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_speed_floor(benchmark, dtype):
    if DEVICE != "cpu":
        pytest.skip("the floors are CPU measurements (benchmarks/RESULTS.md)")
    x, weight, bias, grad = _inputs(16, 3, dtype, "nchw")
    cases = {name: _step(fn, x, weight, bias, grad) for name, fn in IMPLS.items()}
    ratio = speedup(cases, 9, base="eager")
    benchmark.group = "speed floors"
    benchmark.pedantic(lambda: check_floor(
        f"reflect_pad_conv2d fwd+bwd C_out=3 {str(dtype).split('.')[-1]}: eager / fused", ratio,
        FLOORS[dtype], benchmark), rounds=1, iterations=1)
