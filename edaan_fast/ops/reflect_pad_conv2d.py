"""``reflect_pad_conv2d``: the 7x7 output layers of the generator and the attention net.

``reflect_pad_conv2d(x, weight, bias)`` equals ``conv2d(pad(x, p, mode="reflect"), weight,
bias)`` with ``p = (k - 1) / 2`` for a ``k x k`` kernel (k odd, stride 1), for 1 to 4 output
channels: ``G_d``'s last layer (``ReflectionPad2d(3) + Conv2d(64, 3, 7)`` before the tanh) and
``A_d``'s head (``ReflectionPad2d(3) + Conv2d(32, 1, 7)`` before the sigmoid).

Why an op of its own: with so few output channels oneDNN's convolution does about as much work
as for 16 (measured: the same time for 1, 3 and 16 output channels), so these two layers took
~30 % of the tiny preset's CPU training step for ~9 % of its FLOPs. The CPU kernel is a direct
convolution vectorised over the input channels that reads the reflected pixels through index
tables (no padded copy), with forward, grad_input, grad_weight and grad_bias of its own.
float32, float64, bfloat16 and float16 inputs; bfloat16/float16 accumulate in float32 and come
out in their own dtype. Under ``torch.autocast`` it follows ``conv2d``'s rule: float32 inputs
are cast to the autocast dtype. On CUDA it runs ``reflection_pad2d`` + ``conv2d`` through ATen
(cuDNN), which is fast for these shapes already.
"""

from __future__ import annotations

import torch

from . import _library, reference
from ._layout import suggest_memory_format

__all__ = ["MAX_OUT_CHANNELS", "reflect_pad_conv2d"]

#: The most output channels the op takes (``C_out`` accumulators per pixel stay in registers).
MAX_OUT_CHANNELS = 4


def reflect_pad_conv2d(x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(pad(x, (k - 1) // 2, mode="reflect"), weight, bias)`` without the padded copy.

    Args:
        x: ``[N, C, H, W]``, float32/float64/bfloat16/float16, any strides (channels_last is
            kept). ``H`` and ``W`` must exceed the padding ``(k - 1) // 2``, as for
            ``ReflectionPad2d``.
        weight: ``[C_out, C, k, k]`` with ``1 <= C_out <= 4`` and ``k`` odd, x's dtype.
        bias: ``[C_out]`` or None, x's dtype.

    Returns:
        ``[N, C_out, H, W]`` in x's dtype (the autocast dtype under ``torch.autocast``),
        channels_last if x is.
    """
    if _library.reference_enabled():
        return reference.reflect_pad_conv2d(x, weight, bias)
    _library.require_ops("reflect_pad_conv2d")
    _library.require_cuda_kernels("reflect_pad_conv2d", x)
    return torch.ops.edaan_fast.reflect_pad_conv2d.default(x, weight, bias)


def available() -> bool:
    """Whether the loaded library has this op (a library built before it was added has not)."""
    return _library.load_library() and hasattr(torch.ops.edaan_fast, "reflect_pad_conv2d")


# --- fake (meta) kernels; autograd and autocast: csrc/autograd.cpp ---------------------------


def _check_fake(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Shape checks for fake tensors (the real kernels run csrc/ops/reflect_pad_conv2d.h)."""
    torch._check(x.dim() == 4, lambda: f"{op}: x must be a 4-D [N, C, H, W] tensor, got {x.dim()}-D")
    torch._check(
        weight.dim() == 4 and weight.shape[1] == x.shape[1] and weight.shape[2] == weight.shape[3]
        and weight.shape[2] % 2 == 1 and 1 <= weight.shape[0] <= MAX_OUT_CHANNELS,
        lambda: f"{op}: weight must be [C_out <= {MAX_OUT_CHANNELS}, C, k, k] with C = "
        f"{x.shape[1]} and k odd, got {list(weight.shape)}",
    )
    p = (weight.shape[2] - 1) // 2
    torch._check(p < x.shape[2] and p < x.shape[3],
                 lambda: f"{op}: reflection padding {p} must be smaller than H and W of x, got "
                 f"{list(x.shape)}")
    torch._check(weight.dtype == x.dtype and weight.device == x.device,
                 lambda: f"{op}: weight must have the dtype and device of x")


def _register() -> None:
    lib = "edaan_fast::"

    @torch.library.register_fake(lib + "reflect_pad_conv2d")
    def _(x, weight, bias=None):
        _check_fake("reflect_pad_conv2d", x, weight)
        n, _, h, w = x.shape
        return torch.empty((n, weight.shape[0], h, w), dtype=x.dtype, device=x.device,
                           memory_format=suggest_memory_format(x))

    @torch.library.register_fake(lib + "_reflect_pad_conv2d_backward")
    def _(grad, x, weight):
        _check_fake("_reflect_pad_conv2d_backward", x, weight)
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device,
                             memory_format=suggest_memory_format(x))
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
        grad_b = torch.empty((weight.shape[0],), dtype=x.dtype, device=x.device)
        return grad_x, grad_w, grad_b


if available():
    _register()
