"""mask_blend / mask_background against their float64 reference, over the dtype/layout grid."""

from __future__ import annotations

import pytest
import torch

from edaan_fast.ops import mask_background, mask_blend, reference
from tests.conftest import DEVICES, FLOAT_DTYPES, TOL, requires_ops

pytestmark = requires_ops

LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]


def _make(shape, dtype, device, gen, layout="contiguous", low=None):
    t = torch.randn(shape, generator=gen, dtype=torch.float64) if low is None else (
        torch.rand(shape, generator=gen, dtype=torch.float64)
    )
    t = t.to(device=device, dtype=dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontiguous":
        # a strided view: every other column of a wider tensor
        wide = torch.zeros(*shape[:-1], shape[-1] * 2, dtype=dtype, device=device)
        wide[..., ::2] = t
        t = wide[..., ::2]
        assert not t.is_contiguous()
    return t


def _inputs(n, c, h, w, dtype, device, gen, layout, mask_channels=1):
    fg = _make((n, c, h, w), dtype, device, gen, layout)
    bg = _make((n, c, h, w), dtype, device, gen, layout)
    mask = _make((n, mask_channels, h, w), dtype, device, gen, layout, low=0.0)
    return fg, bg, mask


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask_channels", [1, 3])
def test_mask_blend_matches_reference(device, dtype, layout, mask_channels, gen):
    inputs = _inputs(2, 3, 17, 9, dtype, device, gen, layout, mask_channels)
    grad_out = _make((2, 3, 17, 9), dtype, device, gen)
    out, grads = _grads(mask_blend, inputs, grad_out)
    # The oracle runs in float64 on the same (rounded) inputs.
    ref_out, ref_grads = _grads(
        reference.mask_blend, [t.double() for t in inputs], grad_out.double()
    )
    assert out.dtype == dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out.double(), ref_out, **TOL[dtype])
    for g, r, name in zip(grads, ref_grads, ["fg", "bg", "mask"]):
        assert g.shape == r.shape, name
        # the mask gradient sums C products: allow C times the element tolerance
        tol = {k: v * 3 for k, v in TOL[dtype].items()} if name == "mask" else TOL[dtype]
        torch.testing.assert_close(g.double(), r, **tol, msg=f"grad of {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask_channels", [1, 3])
def test_mask_background_matches_reference(device, dtype, layout, mask_channels, gen):
    _, x, mask = _inputs(2, 3, 8, 13, dtype, device, gen, layout, mask_channels)
    grad_out = _make((2, 3, 8, 13), dtype, device, gen)
    out, grads = _grads(mask_background, [x, mask], grad_out)
    ref_out, ref_grads = _grads(reference.mask_background, [x.double(), mask.double()],
                                grad_out.double())
    torch.testing.assert_close(out.double(), ref_out, **TOL[dtype])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, **{k: v * 3 for k, v in TOL[dtype].items()})


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_is_kept(device, gen):
    fg, bg, mask = _inputs(2, 3, 8, 8, torch.float32, device, gen, "channels_last")
    out = mask_blend(fg, bg, mask)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert mask_background(bg, mask).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_extremes_are_exact(device, gen):
    fg, bg, _ = _inputs(2, 3, 8, 8, torch.float32, device, gen, "contiguous")
    ones = torch.ones(2, 1, 8, 8, device=device)
    assert torch.equal(mask_blend(fg, bg, ones), fg)
    assert torch.equal(mask_blend(fg, bg, torch.zeros_like(ones)), bg)
    assert torch.equal(mask_background(bg, torch.zeros_like(ones)), bg)
    assert torch.equal(mask_background(bg, ones), torch.zeros_like(bg))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device, gen):
    fg, bg, mask = _inputs(0, 3, 8, 8, torch.float32, device, gen, "contiguous")
    out, grads = _grads(mask_blend, [fg, bg, mask], torch.empty(0, 3, 8, 8, device=device))
    assert out.shape == (0, 3, 8, 8)
    assert [g.shape for g in grads] == [(0, 3, 8, 8), (0, 3, 8, 8), (0, 1, 8, 8)]


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, gen):
    fg, bg, mask = (t.requires_grad_() for t in _inputs(2, 3, 5, 4, torch.float64, device, gen,
                                                        "contiguous"))
    assert torch.autograd.gradcheck(mask_blend, (fg, bg, mask))
    assert torch.autograd.gradcheck(mask_background, (bg, mask))
    fg_cl, bg_cl, mask_cl = (t.requires_grad_() for t in _inputs(
        2, 3, 5, 4, torch.float64, device, gen, "channels_last"))
    assert torch.autograd.gradcheck(mask_blend, (fg_cl, bg_cl, mask_cl))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(device, layout, gen):
    fg, bg, mask = (t.requires_grad_() for t in _inputs(2, 3, 6, 5, torch.float32, device, gen,
                                                        layout))
    torch.library.opcheck(torch.ops.edaan_fast.mask_blend.default, (fg, bg, mask))
    torch.library.opcheck(torch.ops.edaan_fast.mask_background.default, (bg, mask))
    full = torch.rand(2, 3, 6, 5, device=device, generator=None).requires_grad_()
    torch.library.opcheck(torch.ops.edaan_fast.mask_blend.default, (fg, bg, full))
    g = torch.randn(2, 3, 6, 5, device=device)
    torch.library.opcheck(torch.ops.edaan_fast._mask_blend_backward.default,
                          (g, fg.detach(), bg.detach(), mask.detach()))
    torch.library.opcheck(torch.ops.edaan_fast._mask_background_backward.default,
                          (g, bg.detach(), mask.detach()))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device, gen):
    fg, bg, mask = _inputs(2, 3, 8, 8, torch.float32, device, gen, "contiguous")

    def step(fg, bg, mask):
        return mask_blend(fg, bg, mask).sum() + mask_background(bg, mask).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (fg, bg, mask)]
    out = compiled(*leaves)
    out.backward()
    ref_leaves = [t.clone().requires_grad_() for t in (fg, bg, mask)]
    ref = step(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_torch_compile_inductor(gen):
    fg, bg, mask = _inputs(2, 3, 8, 8, torch.float32, "cpu", gen, "contiguous")
    compiled = torch.compile(lambda a, b, m: mask_blend(a, b, m) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(fg, bg, mask), 2 * reference.mask_blend(fg, bg, mask))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_promotes_like_eager(device, gen):
    """Under autocast a float32 image meets a low-precision generator output and mask."""
    fg, bg, mask = _inputs(2, 3, 8, 8, torch.float32, device, gen, "contiguous")
    low = torch.bfloat16
    with torch.autocast(device_type=device, dtype=low):
        out = mask_blend(fg, bg.to(low), mask.to(low))
        eager = reference.mask_blend(fg, bg.to(low), mask.to(low))
    assert out.dtype == eager.dtype == torch.float32
    # Eager rounds (1 - mask) * bg in bfloat16; the fused op computes in float32 throughout.
    exact = reference.mask_blend(fg.double(), bg.to(low).double(), mask.to(low).double())
    torch.testing.assert_close(out.double(), exact, **TOL[torch.float32])


# --- input checks: one per check, each matching its message ---------------------------------


def test_rejects_shape_mismatch(gen):
    fg = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"mask_blend: fg and bg must have the same shape"):
        torch.ops.edaan_fast.mask_blend(fg, torch.randn(2, 3, 8, 9), torch.rand(2, 1, 8, 8))


def test_rejects_non_4d(gen):
    with pytest.raises(RuntimeError, match=r"mask_background: x must be a 4-D \[N, C, H, W\]"):
        torch.ops.edaan_fast.mask_background(torch.randn(3, 8, 8), torch.rand(1, 8, 8))


def test_rejects_bad_mask_channels(gen):
    fg = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"mask must be \[N, 1, H, W\] or \[N, C, H, W\]"):
        torch.ops.edaan_fast.mask_blend(fg, fg.clone(), torch.rand(2, 2, 8, 8))


def test_rejects_mask_spatial_mismatch(gen):
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"mask_background: mask must be .* got \[2, 1, 4, 4\]"):
        torch.ops.edaan_fast.mask_background(x, torch.rand(2, 1, 4, 4))


def test_rejects_integer_dtype(gen):
    x = torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"mask_blend: bg must be floating point .* got Byte"):
        torch.ops.edaan_fast.mask_blend(x, x, x[:, :1])


def test_rejects_dtype_mismatch(gen):
    fg = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"mask_blend: fg and bg must have the same dtype"):
        torch.ops.edaan_fast.mask_blend(fg, fg.double(), torch.rand(2, 1, 8, 8))
    with pytest.raises(RuntimeError, match=r"mask_blend: mask must have the dtype of bg"):
        torch.ops.edaan_fast.mask_blend(fg, fg, torch.rand(2, 1, 8, 8).double())


def test_rejects_wrong_device(gen):
    """A mask on another device: the meta device stands in for a second device on CPU hosts."""
    fg = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"mask_blend: all inputs must be on one device"):
        torch.ops.edaan_fast.mask_blend(fg, fg, torch.rand(2, 1, 8, 8, device="meta"))


@pytest.mark.cuda
def test_rejects_cpu_cuda_mix():
    fg = torch.randn(2, 3, 8, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"mask_blend: mask must be on the device of bg"):
        torch.ops.edaan_fast.mask_blend(fg, fg, torch.rand(2, 1, 8, 8))


def test_rejects_grad_mismatch(gen):
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"_mask_blend_backward: grad must match"):
        torch.ops.edaan_fast._mask_blend_backward(torch.randn(2, 3, 8, 7), x, x,
                                                  torch.rand(2, 1, 8, 8))


def test_wrapper_promotes_mixed_dtypes(gen):
    fg = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    bg = torch.randn(2, 3, 4, 4)
    mask = torch.rand(2, 1, 4, 4, dtype=torch.float16)
    out = mask_blend(fg, bg, mask)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.mask_blend(fg, bg.double(), mask.double()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mask_channels", [1, 3])
def test_many_blocks_and_threads(device, layout, mask_channels, gen):
    """Images larger than one CPU block (2,048 pixels), with a partial last block."""
    inputs = _inputs(3, 3, 64, 81, torch.float32, device, gen, layout, mask_channels)
    grad_out = _make((3, 3, 64, 81), torch.float32, device, gen)
    out, grads = _grads(mask_blend, inputs, grad_out)
    ref_out, ref_grads = _grads(reference.mask_blend, [t.double() for t in inputs],
                                grad_out.double())
    torch.testing.assert_close(out.double(), ref_out, **TOL[torch.float32])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["blend", "background"])
def test_zero_channels_give_a_zero_mask_gradient(device, op):
    """C == 0: no kernel runs; the mask gradient (a sum over no channels) is zeros, not
    whatever the allocator held."""
    for _ in range(3):  # reuse freed blocks that held non-zero values
        torch.full((4096,), 7.0, device=device)
    x = torch.randn(2, 0, 5, 6, device=device)
    mask = torch.rand(2, 1, 5, 6, device=device)
    grad = torch.randn(2, 0, 5, 6, device=device)
    if op == "blend":
        grads = torch.ops.edaan_fast._mask_blend_backward(grad, x, x, mask)
    else:
        grads = torch.ops.edaan_fast._mask_background_backward(grad, x, mask)
    g_mask = grads[-1]
    assert g_mask.shape == mask.shape and torch.equal(g_mask, torch.zeros_like(mask))


@pytest.mark.cuda
@pytest.mark.parametrize("mask_channels", [1, 64])
def test_cuda_beyond_one_grid_wave_channels_last_64(mask_channels, gen):
    """More pixels than one wave of the grid (SMs x 32 blocks x 256 threads), C = 64 in
    channels_last (the interleaved walk), against the CPU."""
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    h = (sm * 32 * 256) // (2 * 64) + 3  # pixels of 2 images > one wave
    inputs = _inputs(2, 64, h, 64, torch.float32, "cpu", gen, "channels_last", mask_channels)
    grad_out = _make((2, 64, h, 64), torch.float32, "cpu", gen, "channels_last")
    out_c, grads_c = _grads(mask_blend, inputs, grad_out)
    out_g, grads_g = _grads(mask_blend, [t.cuda() for t in inputs], grad_out.cuda())
    torch.testing.assert_close(out_g.cpu(), out_c, atol=1e-6, rtol=1e-6)
    for g, c in zip(grads_g, grads_c):
        torch.testing.assert_close(g.cpu(), c, atol=1e-4, rtol=1e-5)


@pytest.mark.cuda
def test_cuda_side_stream_and_bit_equal_backward(gen):
    """On a non-default stream the op orders itself after the stream's work; two backward
    passes give bit-equal gradients (no atomics)."""
    inputs = [t.cuda() for t in _inputs(4, 3, 96, 48, torch.float32, "cpu", gen, "contiguous")]
    grad_out = torch.randn(4, 3, 96, 48, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        first = _grads(mask_blend, inputs, grad_out)
        second = _grads(mask_blend, inputs, grad_out)
    stream.synchronize()
    ref_out, _ = _grads(reference.mask_blend, [t.double() for t in inputs], grad_out.double())
    torch.testing.assert_close(first[0].double(), ref_out, **TOL[torch.float32])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)
