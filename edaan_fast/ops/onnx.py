"""The ONNX form of the fused operators, for ``torch.onnx.export(dynamo=True)``: each op as
standard ONNX operators, so an exported model runs on any ONNX runtime without our library.

``mask_blend(fg, bg, mask)`` (EDAAN eq. 1/2) becomes ``Add(Mul(mask, fg), Mul(Sub(1, mask),
bg))`` -- the formula of :func:`edaan_fast.ops.reference.mask_blend`, with the ``[N, 1, H, W]``
mask broadcast over channels by ONNX's own broadcasting. ``mask_background`` (training only)
becomes ``Mul(Sub(1, mask), x)``. ``reflect_pad_conv2d(x, weight, bias)`` (the 7x7 output
layers) becomes ``Conv(Pad(x, mode="reflect"), weight, bias)``, the padding ``(k - 1) / 2`` read
from the weight's shape. Needs ``onnxscript`` (``pip install "edaan_fast[export]"``),
imported only when :func:`onnx_translation_table` is called.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _library

__all__ = ["onnx_translation_table"]


def onnx_translation_table() -> dict[Callable, Callable]:
    """``custom_translation_table`` for :func:`torch.onnx.export`: our ops -> onnxscript
    functions of standard ONNX operators (empty when the library is not loaded, i.e. when a
    model cannot hold our ops)."""
    from onnxscript import opset18 as op

    def mask_blend(fg, bg, mask):
        one = op.CastLike(1.0, mask)
        return op.Add(op.Mul(mask, fg), op.Mul(op.Sub(one, mask), bg))

    def mask_background(x, mask):
        return op.Mul(op.Sub(op.CastLike(1.0, mask), mask), x)

    def reflect_pad_conv2d(x, weight, bias=None):
        k = op.Shape(weight, start=3, end=4)
        p = op.Div(op.Sub(k, op.Constant(value_ints=[1])), op.Constant(value_ints=[2]))
        zeros = op.Constant(value_ints=[0, 0])
        pads = op.Concat(zeros, p, p, zeros, p, p, axis=0)  # begins of N, C, H, W, then ends
        padded = op.Pad(x, pads, mode="reflect")
        return op.Conv(padded, weight) if bias is None else op.Conv(padded, weight, bias)

    if not _library.load_library():
        return {}
    table = {torch.ops.edaan_fast.mask_blend.default: mask_blend,
             torch.ops.edaan_fast.mask_background.default: mask_background}
    if hasattr(torch.ops.edaan_fast, "reflect_pad_conv2d"):
        table[torch.ops.edaan_fast.reflect_pad_conv2d.default] = reflect_pad_conv2d
    return table
