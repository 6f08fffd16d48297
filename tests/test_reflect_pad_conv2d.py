"""reflect_pad_conv2d against its twin (reflection pad + conv2d) over sizes, dtypes and layouts."""

from __future__ import annotations

import pytest
import torch

from edaan_fast.ops import reference, reflect_pad_conv2d
from tests.conftest import DEVICES, requires_ops

pytestmark = requires_ops

LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]

# (N, C, H, W, C_out, k): odd sizes, H or W as small as the reflection allows (pad < size),
# C not a multiple of a vector's lanes, k = 1.
SHAPES = [
    (2, 16, 9, 13, 3, 7),
    (1, 16, 4, 4, 1, 7),
    (3, 17, 6, 11, 4, 5),
    (2, 5, 7, 4, 2, 3),
    (2, 3, 5, 9, 3, 7),
    (1, 9, 3, 5, 4, 1),
    (2, 20, 5, 21, 1, 7),
]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        t = wide[..., ::2]
        assert not t.is_contiguous()
    return t


def _inputs(shape, dtype, device, gen, layout="contiguous", bias=True):
    n, c, h, w, co, k = shape
    x = _layout(torch.randn(n, c, h, w, generator=gen, dtype=torch.float64), layout)
    weight = torch.randn(co, c, k, k, generator=gen, dtype=torch.float64) / (c * k * k) ** 0.5
    b = torch.randn(co, generator=gen, dtype=torch.float64) if bias else None
    grad = torch.randn(n, co, h, w, generator=gen, dtype=torch.float64)
    conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return conv(x), conv(weight), conv(b), conv(grad)


def _run(fn, x, weight, bias, grad):
    """Output and (grad_x, grad_weight, grad_bias) of ``fn``, grad_bias None without bias."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_float64_matches_reference(device, layout, shape, bias, gen):
    x, weight, b, grad = _inputs(shape, torch.float64, device, gen, layout, bias)
    out, grads = _run(reflect_pad_conv2d, x, weight, b, grad)
    ref, ref_grads = _run(reference.reflect_pad_conv2d, x, weight, b, grad)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for g, r, name in zip(grads, ref_grads, ["x", "weight", "bias"]):
        if r is None:
            assert g is None
            continue
        assert g.shape == r.shape, name
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10, msg=f"grad of {name}")


def _tolerance(shape, x, weight, bias, grad, unit):
    """Per-element bounds on the output and each gradient of a low-precision run against the
    float32 twin on the same (rounded) inputs: the result's one rounding to the output dtype
    (``unit`` |value|) plus float32 accumulation over the terms of the sum (their count times
    2^-24 times the sum of the terms' magnitudes, the twin run on |inputs|)."""
    n, c, h, w, co, k = shape
    f32 = 2.0 ** -24
    absolute = [None if t is None else t.abs() for t in (x, weight, bias, grad)]
    abs_out, abs_grads = _run(reference.reflect_pad_conv2d, *absolute)
    terms = [c * k * k + 1, co * k * k * 4, n * h * w * 4, n * h * w]  # out, gx, gw, gb
    return [terms[0] * f32 * abs_out] + [
        None if g is None else t * f32 * g for g, t in zip(abs_grads, terms[1:])
    ], unit


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_low_precision_within_rounding(dtype, layout, shape, gen):
    x, weight, b, grad = _inputs(shape, dtype, "cpu", gen, layout)
    out, grads = _run(reflect_pad_conv2d, x, weight, b, grad)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    # the twin in float32 on the very inputs the op saw
    up = [t.float() for t in (x, weight, b, grad)]
    ref, ref_grads = _run(reference.reflect_pad_conv2d, *up)
    unit = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}[dtype]
    accum, unit = _tolerance(shape, *up, unit)
    for got, want, acc, name in zip([out, *grads], [ref, *ref_grads], accum,
                                    ["out", "x", "weight", "bias"]):
        bound = unit * want.abs() + acc + 1e-30
        err = (got.float() - want).abs()
        assert (err <= bound).all(), (
            f"{name}: max error / bound {(err / bound).max().item():.3g}")


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_is_kept(device, gen):
    x, weight, b, grad = _inputs((2, 16, 8, 6, 3, 7), torch.float32, device, gen, "channels_last")
    out, grads = _run(reflect_pad_conv2d, x, weight, b, grad)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    assert grads[1].is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device, gen):
    x, weight, b, grad = _inputs((0, 4, 5, 5, 2, 3), torch.float32, device, gen)
    out, grads = _run(reflect_pad_conv2d, x, weight, b, grad)
    assert out.shape == (0, 2, 5, 5)
    assert grads[0].shape == x.shape
    assert torch.equal(grads[1], torch.zeros_like(weight))
    assert torch.equal(grads[2], torch.zeros_like(b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 2, 3), (1, 2, 4, 5, 1, 7)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gradcheck(device, shape, gen):
    x, weight, b, _ = _inputs(shape, torch.float64, device, gen)
    leaves = [t.requires_grad_() for t in (x, weight, b)]
    assert torch.autograd.gradcheck(reflect_pad_conv2d, leaves)
    assert torch.autograd.gradcheck(lambda a, w: reflect_pad_conv2d(a, w), leaves[:2])
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(reflect_pad_conv2d, (xc, leaves[1], leaves[2]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(device, layout, bias, gen):
    x, weight, b, grad = _inputs((2, 5, 6, 7, 3, 5), torch.float32, device, gen, layout, bias)
    leaves = [None if t is None else t.requires_grad_() for t in (x, weight, b)]
    torch.library.opcheck(torch.ops.edaan_fast.reflect_pad_conv2d.default, tuple(leaves))
    torch.library.opcheck(torch.ops.edaan_fast._reflect_pad_conv2d_backward.default,
                          (grad, x.detach(), weight.detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device, gen):
    x, weight, b, _ = _inputs((2, 16, 8, 6, 3, 7), torch.float32, device, gen)

    def step(x, weight, b):
        return torch.tanh(reflect_pad_conv2d(x, weight, b)).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    compiled(*leaves).backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    step(*ref_leaves).backward()
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_follows_conv2d(device, gen):
    """Under autocast float32 inputs run in the autocast dtype, as conv2d's do; float32
    parameters get float32 gradients."""
    x, weight, b, _ = _inputs((2, 16, 8, 6, 3, 7), torch.float32, device, gen)
    leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = reflect_pad_conv2d(*leaves)
        ref = reference.reflect_pad_conv2d(*ref_leaves)
    assert out.dtype == ref.dtype == torch.bfloat16
    # both round the inputs to bfloat16 and accumulate in float32: apart by output roundings
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    out.float().square().sum().backward()
    ref.float().square().sum().backward()
    for a, r in zip(leaves, ref_leaves):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, r.grad, atol=5e-2, rtol=5e-2)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        assert reflect_pad_conv2d(x.double(), weight.double(), b.double()).dtype == torch.float64


# --- input checks: one per check, each matching its message ---------------------------------

op = torch.ops.edaan_fast.reflect_pad_conv2d


def test_rejects_non_4d():
    with pytest.raises(RuntimeError, match=r"reflect_pad_conv2d: x must be a 4-D \[N, C, H, W\]"):
        op(torch.randn(3, 8, 8), torch.randn(1, 3, 3, 3))


def test_rejects_integer_dtype():
    with pytest.raises(RuntimeError, match=r"x must be float32, float64, bfloat16 or float16"):
        op(torch.ones(1, 3, 8, 8, dtype=torch.int32), torch.ones(1, 3, 3, 3, dtype=torch.int32))


def test_rejects_channel_mismatch():
    with pytest.raises(RuntimeError, match=r"weight must be \[C_out, C, k, k\] with C = 3"):
        op(torch.randn(1, 3, 8, 8), torch.randn(1, 4, 3, 3))


def test_rejects_even_kernel():
    with pytest.raises(RuntimeError, match=r"k odd, got \[1, 3, 4, 4\]"):
        op(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4))


def test_rejects_too_many_output_channels():
    with pytest.raises(RuntimeError, match=r"weight must have 1 to 4 output channels .* got 5"):
        op(torch.randn(1, 3, 8, 8), torch.randn(5, 3, 3, 3))


def test_rejects_weight_dtype():
    with pytest.raises(RuntimeError, match=r"weight must have the dtype of x \(Float\), got Double"):
        op(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 3, 3, dtype=torch.float64))


def test_rejects_bias_shape():
    with pytest.raises(RuntimeError, match=r"bias must be \[C_out\] = \[2\], got \[3\]"):
        op(torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3, 3), torch.randn(3))


def test_rejects_bias_dtype():
    with pytest.raises(RuntimeError, match=r"bias must have the dtype of x \(Float\), got Double"):
        op(torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3, 3), torch.randn(2, dtype=torch.float64))


@pytest.mark.parametrize("hw", [(3, 8), (8, 3)])
def test_rejects_padding_not_below_size(hw):
    with pytest.raises(RuntimeError, match=r"reflection padding 3 \(kernel 7\) must be smaller "
                                           r"than H and W of x"):
        op(torch.randn(1, 3, *hw), torch.randn(1, 3, 7, 7))


def test_backward_rejects_grad_shape():
    with pytest.raises(RuntimeError, match=r"_reflect_pad_conv2d_backward: grad must be "
                                           r"\[N, C_out, H, W\] = \[1, 2, 8, 8\]"):
        torch.ops.edaan_fast._reflect_pad_conv2d_backward(
            torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3, 3))


# --- the models' output layers ------------------------------------------------------------


def _count_op_calls(monkeypatch):
    from edaan_fast.models import blocks

    calls = []
    real = blocks.reflect_pad_conv2d

    def counting(*args):
        calls.append(args[1].shape)
        return real(*args)

    monkeypatch.setattr(blocks, "reflect_pad_conv2d", counting)
    return calls


@pytest.mark.parametrize("net", ["generator", "attention"])
def test_models_output_layer_fused_matches_plain(net, monkeypatch, gen):
    """The generator's and the attention net's 7x7 output layers run the op on the CPU, with the
    same parameters (state_dict) and the same outputs and gradients as the plain modules."""
    from edaan_fast.models import blocks
    from edaan_fast.models.attention import AttentionNet
    from edaan_fast.models.generator import Generator

    torch.manual_seed(0)
    if net == "generator":
        model = Generator(out_channels=3, width=8, downsamplings=2, res_blocks=1)
        x = torch.randn(2, 32, 8, 4, generator=gen)
        conv_key = f"body.{len(model.body) - 2}.weight"
    else:
        model = AttentionNet(widths=(8, 16))
        x = torch.randn(2, 3, 16, 12, generator=gen)
        conv_key = "head.1.weight"
    assert conv_key in model.state_dict()  # the keys of the plain Sequential, unchanged
    calls = _count_op_calls(monkeypatch)

    def run(fused):
        monkeypatch.setattr(blocks, "FUSED_OUTPUT_CONV", fused)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    out_plain, grads_plain = run(False)
    assert calls == []
    out_fused, grads_fused = run(True)
    assert len(calls) == 1 and calls[0][0] == (3 if net == "generator" else 1)
    torch.testing.assert_close(out_fused, out_plain, atol=1e-5, rtol=1e-5)
    for k in grads_plain:
        torch.testing.assert_close(grads_fused[k], grads_plain[k], atol=1e-4, rtol=1e-4,
                                   msg=f"grad of {k}")


def test_models_output_layer_compiles_fullgraph(monkeypatch, gen):
    """``train --compile``: dynamo traces the fused output layer (the op stays opaque, through
    its fake kernel) without a graph break."""
    from edaan_fast.models import blocks
    from edaan_fast.models.attention import AttentionNet

    calls = _count_op_calls(monkeypatch)
    torch.manual_seed(0)
    model = AttentionNet(widths=(8, 16))
    x = torch.randn(2, 3, 16, 12, generator=gen)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert len(calls) == 1
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(blocks, "FUSED_OUTPUT_CONV", False)
    ref = model(x)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, atol=1e-4, rtol=1e-4, msg=k)
